"""The migration guide (docs/from-official.md) and the README's code blocks name only flags that
exist: each command's flags are looked up in the --help of the command it runs; and every flag
of every command is named somewhere in the README or the docs."""

import importlib
import os
import re

import pytest

DOC = os.path.join(os.path.dirname(__file__), "..", "docs", "from-official.md")
COMMANDS = {  # how a cell names its command -> the module whose main(["--help"]) lists its flags
    "fastcgan-download": "fastcgan.data.download",
    "fastcgan-translate": "fastcgan.translate",
    "fastcgan-eval": "fastcgan.evaluate",
    "fastcgan-export": "fastcgan.deploy.cli",
    "fastcgan.data.combine": "fastcgan.data.combine",
    "fastcgan.data.synthetic": "fastcgan.data.synthetic",
    "fastcgan.train": "fastcgan.train.cli",
}
SECTION_DEFAULT = {"Scripts": "fastcgan.data.download", "Training": "fastcgan.train.cli", "Testing": "fastcgan.translate",
                   "CUT / FastCUT (taesungp/contrastive-unpaired-translation)": "fastcgan.train.cli"}
FLAG = re.compile(r"(?<![\w-])(--[A-Za-z][\w-]*)")


def _rows():
    """(section, fastcgan cell) of every table row."""
    section = None
    with open(DOC, encoding="utf-8") as f:
        for line in f:
            if line.startswith("## "):
                section = line[3:].split(":")[0].strip()
            elif line.startswith("| ") and not line.startswith("| ---") and not line.startswith("| official"):
                cells = [c.strip() for c in line.strip().strip("|").split(" | ")]
                assert len(cells) == 2, line
                yield section, cells[1]


def _help(module: str, capsys) -> str:
    with pytest.raises(SystemExit) as e:
        importlib.import_module(module).main(["--help"])
    assert e.value.code == 0
    return capsys.readouterr().out


def test_every_flag_in_the_migration_guide_exists(capsys):
    helps, checked = {}, 0
    for section, cell in _rows():
        for span in re.findall(r"`([^`]+)`", cell):
            named = [(span.index(name), m) for name, m in COMMANDS.items() if name in span]
            start, module = min(named) if named else (0, SECTION_DEFAULT.get(section))
            flags = FLAG.findall(span[start:])  # a launcher's own flags (torchrun ...) come before
            if not flags:
                continue
            assert module is not None, f"{section}: no command for `{span}`"
            if module not in helps:
                helps[module] = set(FLAG.findall(_help(module, capsys)))
            missing = [f for f in flags if f not in helps[module]]
            assert not missing, f"{section}: `{span}` names {missing}, which {module} does not have"
            checked += len(flags)
    assert checked > 60  # the tables were read


README = os.path.join(os.path.dirname(__file__), "..", "README.md")


def _readme_commands():
    """(line number, command) of every fastcgan command in README.md's code blocks, with its
    backslash-continued lines joined and its trailing comment removed."""
    with open(README, encoding="utf-8") as f:
        lines = f.read().splitlines()
    in_block, pending = False, None
    for i, line in enumerate(lines, 1):
        if line.startswith("```"):
            in_block = not in_block
            continue
        if not in_block:
            continue
        text = line.split(" #", 1)[0].rstrip()
        if pending is not None:
            pending = (pending[0], pending[1] + " " + text.rstrip("\\").strip())
        elif any(name in text for name in COMMANDS):
            pending = (i, text.rstrip("\\").strip())
        if pending is not None and not text.endswith("\\"):
            yield pending
            pending = None


def test_every_flag_in_the_readme_commands_exists(capsys):
    """Each command line of the README's code blocks names only flags its command has."""
    helps, checked = {}, 0
    for lineno, command in _readme_commands():
        start, module = min((command.index(name), m) for name, m in COMMANDS.items() if name in command)
        if module not in helps:
            helps[module] = set(FLAG.findall(_help(module, capsys)))
        missing = [f for f in FLAG.findall(command[start:]) if f not in helps[module]]
        assert not missing, f"README.md:{lineno}: `{command}` names {missing}, which {module} does not have"
        checked += 1
    assert checked > 30  # the code blocks were read


OPTION_LINE = re.compile(r"^  (-\S.*?)(?:\s{2,}|$)")  # argparse's "  --flag X, --alias X   help"


def test_every_flag_of_every_command_is_documented(capsys):
    """The README says --help lists every flag and names those it does not explain elsewhere: a
    new flag that neither it nor docs/ names fails here (flags in the usage lines of --help only,
    not those its prose mentions)."""
    docs = [README] + [os.path.join(os.path.dirname(DOC), f) for f in sorted(os.listdir(os.path.dirname(DOC)))
                       if f.endswith(".md")]
    named = set()
    for path in docs:
        with open(path, encoding="utf-8") as f:
            named |= set(FLAG.findall(f.read()))
    undocumented, checked = [], 0
    for module in sorted(set(COMMANDS.values())):
        for line in _help(module, capsys).splitlines():
            m = OPTION_LINE.match(line)
            for flag in FLAG.findall(m.group(1)) if m else ():
                checked += 1
                if flag != "--help" and flag not in named:
                    undocumented.append(f"{module} {flag}")
    assert not undocumented, f"flags named neither in README.md nor in docs/: {undocumented}"
    assert checked > 150  # every command's options were read


def test_every_option_has_help_and_training_flags_name_their_defaults(capsys):
    """--help explains every option (none is a bare name), and fastcgan-train's valued flags say
    their default: the flags default to "not given" (the presets decide), so argparse alone printed
    none, and --load-size / --lr / --pool-size ... were listed without a word."""
    bare = []
    for module in sorted(set(COMMANDS.values())):
        lines = _help(module, capsys).splitlines()
        for i, line in enumerate(lines):
            m = OPTION_LINE.match(line)
            explained = m and (line[m.end():].strip() or (i + 1 < len(lines) and lines[i + 1].startswith(" " * 8)))
            if m and not explained:
                bare.append(f"{module} {m.group(1).strip()}")
    assert not bare, f"options without a help text: {bare}"

    from fastcgan.train.cli import build_parser
    from fastcgan.train.config import FIELD_SECTION

    undefaulted = [a.option_strings[0] for a in build_parser()._actions
                   if a.dest in FIELD_SECTION and a.nargs != 0 and "default" not in a.help
                   and a.dest not in ("dataroot", "init_official", "init_generators", "resume")]  # nothing if not given
    assert not undefaulted, f"training flags whose --help gives no default: {undefaulted}"
    text = " ".join(_help("fastcgan.train.cli", capsys).split())
    for shown in ("images are resized to this before the crop (default 286; cyclegan128, discogan: 143; udacity: 128)",
                  "(default 0.0002)", "(default 50; udacity, pix2pix, colorization, cut, fastcut: 0)",
                  "PatchNCE temperature (default 0.07)"):
        assert shown in text, shown


def test_console_scripts_resolve_and_train_exits_like_the_module():
    """Each [project.scripts] entry names a callable; fastcgan-train leaves through exit_after, as
    `python -m fastcgan.train` does (it pointed at main, which skipped it under torchrun)."""
    import subprocess
    import sys

    tomllib = pytest.importorskip("tomllib")
    with open(os.path.join(os.path.dirname(__file__), "..", "pyproject.toml"), "rb") as f:
        scripts = tomllib.load(f)["project"]["scripts"]
    for name, target in scripts.items():
        module, _, attr = target.partition(":")
        assert callable(getattr(importlib.import_module(module), attr)), name
    assert scripts["fastcgan-train"] == "fastcgan._cli:train_command"
    code = ("import sys; from fastcgan._cli import train_command; "
            "sys.argv = ['fastcgan-train', '--lr', 'x']; sys.exit(train_command())")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and "--lr" in p.stderr, p.stderr


@pytest.mark.parametrize("module, argv, hints", [
    ("fastcgan.train.cli", ["--load_size", "64", "--n_epochs=5"],
     ["--load_size is spelled --load-size here", "--n_epochs (official) is --epochs here"]),
    ("fastcgan.train.cli", ["--model", "cycle_gan"], ["--model cycle_gan (official) is --model cyclegan here"]),
    ("fastcgan.translate", ["--dataroot", "d", "--results_dir", "r"],
     ["--dataroot (official) is --input", "--results_dir (official) is --output here"]),
])
def test_official_spellings_get_this_commands_name(module, argv, hints, capsys):
    """Someone coming from the official repository types its flags: exit 2 with the spelling
    here, and one line pointing at --help instead of a ~50-line usage."""
    with pytest.raises(SystemExit) as e:
        importlib.import_module(module).main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and all(h in err for h in hints), err
    assert "usage:" not in err and "--help lists every option" in err


def test_official_flag_maps_name_real_flags(capsys):
    """Every replacement the official-flag maps name exists in its command."""
    from fastcgan.train.cli import OFFICIAL_TRAIN_FLAGS
    from fastcgan.translate import OFFICIAL_TEST_FLAGS

    for module, table in (("fastcgan.train.cli", OFFICIAL_TRAIN_FLAGS), ("fastcgan.translate", OFFICIAL_TEST_FLAGS)):
        flags = set(importlib.import_module(module).build_parser()._option_string_actions)
        for official, ours in table.items():
            named = [f for f in FLAG.findall(ours) if f != official]
            assert all(f in flags for f in named), f"{module}: {official} -> {ours}"
            assert official not in flags, f"{module} has {official} itself"
