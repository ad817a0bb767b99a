"""Export and runtimes for trained generators (installed as fastcgan.deploy)."""
