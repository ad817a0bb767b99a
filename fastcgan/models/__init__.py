"""Networks (official CycleGAN generators/discriminators and the tutorial's), official checkpoint
conversion and self-describing generator files."""

from fastcgan.models._blocks import (
    BN_INFERENCE_MODES,
    NORMS,
    ActPad,
    BatchNormAct,
    convolution_input_elements,
    init_weights,
    norm_act,
    set_bn_inference,
)
from fastcgan.models.discriminators import (
    DISCRIMINATOR_ARCHS,
    NLayerDiscriminator,
    PixelDiscriminator,
    UdacityDiscriminator,
    build_discriminator,
)
from fastcgan.models.generators import (
    COLOR_SPACES,
    GENERATOR_ARCHS,
    LabColorizer,
    PaddedResidualBlock,
    ResnetGenerator,
    UdacityGenerator,
    UnetGenerator,
    build_generator,
    generator_size_multiple,
)
from fastcgan.models.io import (
    generator_filename,
    load_generator,
    read_generator_config,
    read_generator_direction,
    read_pairs_direction,
    resolve_generator_path,
    save_generator,
)
from fastcgan.models.official import (
    load_official_generator,
    load_official_state_dict,
    official_state_dict,
    save_official_generator,
)

__all__ = [
    "BN_INFERENCE_MODES",
    "set_bn_inference",
    "NORMS",
    "ActPad",
    "BatchNormAct",
    "convolution_input_elements",
    "init_weights",
    "norm_act",
    "DISCRIMINATOR_ARCHS",
    "NLayerDiscriminator",
    "PixelDiscriminator",
    "UdacityDiscriminator",
    "build_discriminator",
    "COLOR_SPACES",
    "GENERATOR_ARCHS",
    "LabColorizer",
    "PaddedResidualBlock",
    "ResnetGenerator",
    "UdacityGenerator",
    "UnetGenerator",
    "build_generator",
    "generator_size_multiple",
    "generator_filename",
    "load_generator",
    "read_generator_config",
    "read_generator_direction",
    "read_pairs_direction",
    "resolve_generator_path",
    "save_generator",
    "load_official_generator",
    "load_official_state_dict",
    "official_state_dict",
    "save_official_generator",
]
