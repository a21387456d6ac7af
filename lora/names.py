"""Module-name translation: our checkpoint-named paths to the diffusers names that kohya and peft files use.

sd-scripts trains SD1/SD2 LoRAs on the diffusers UNet, so its keys spell diffusers' block names with dots
turned into underscores (`lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q`). Our UNet
keeps the original LDM names (`input_blocks.1.1.transformer_blocks.0.attn1.to_q`). The two layouts differ
only in how blocks are numbered, which follows from the number of res blocks per level, so the mapping is
arithmetic, not a table. For SDXL, sd-scripts trains its own LDM-named UNet, so its SDXL files spell our paths
(`lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q`), and its two text encoders get the prefixes
`lora_te1_` (CLIP-L) and `lora_te2_` (OpenCLIP bigG, in CLIPTextModel names).
"""

from __future__ import annotations

import re

# Inside a ResBlock: LDM Sequential indices -> diffusers ResnetBlock2D attribute names.
RESBLOCK_NAMES = {
    "in_layers.0": "norm1",
    "in_layers.2": "conv1",
    "emb_layers.1": "time_emb_proj",
    "out_layers.0": "norm2",
    "out_layers.3": "conv2",
    "skip_connection": "conv_shortcut",
}

# Top-level layers outside the blocks.
TOP_NAMES = {
    "input_blocks.0.0": "conv_in",
    "time_embed.0": "time_embedding.linear_1",
    "time_embed.2": "time_embedding.linear_2",
    "out.0": "conv_norm_out",
    "out.2": "conv_out",
}

# Model parts: the UNet, SD1/SD2's text encoder ("te"), SDXL's two ("te1" CLIP-L, "te2" OpenCLIP bigG).
KOHYA_PREFIX = {"unet": "lora_unet_", "te": "lora_te_", "te1": "lora_te1_", "te2": "lora_te2_"}
DIFFUSERS_PREFIX = {"unet": "unet.", "te": "text_encoder.", "te1": "text_encoder.", "te2": "text_encoder_2."}
TEXT_PARTS = ("te", "te1", "te2")


def _resblock(rest: str, path: str) -> str:
    for ldm, diff in RESBLOCK_NAMES.items():
        if rest == ldm or rest.startswith(ldm + "."):
            return diff + rest[len(ldm):]
    raise ValueError(f"{path!r}: {rest!r} is not a ResBlock layer")


def _is_resblock(rest: str) -> bool:
    return rest.split(".")[0] in {"in_layers", "emb_layers", "out_layers", "skip_connection"}


def unet_to_diffusers(path: str, num_res_blocks: int) -> str:
    """The diffusers name of a UNet module: 'input_blocks.1.1.proj_in' -> 'down_blocks.0.attentions.0.proj_in'.

    Layout of the LDM UNet with n = num_res_blocks: input_blocks[0] is conv_in; then each level holds n
    blocks (ResBlock [+ SpatialTransformer]) and, except the last level, one Downsample block. The
    middle block is ResBlock [+ transformer] + ResBlock. Each decoder level holds n + 1 blocks, the last
    of which (except at the top level) ends with an Upsample. Diffusers numbers up_blocks in that
    same deepest-first order, so an index divides into (level, position) the same way on both sides.
    """
    for ldm, diff in TOP_NAMES.items():
        if path == ldm or path.startswith(ldm + "."):
            return diff + path[len(ldm):]
    n = num_res_blocks
    m = re.fullmatch(r"(input_blocks|output_blocks)\.(\d+)\.(\d+)\.(.+)", path)
    if m:
        kind, block, child, rest = m.group(1), int(m.group(2)), int(m.group(3)), m.group(4)
        if kind == "input_blocks":
            level, pos = divmod(block - 1, n + 1)
            where = f"down_blocks.{level}"
            if pos == n:  # the level's last block is its Downsample
                if child == 0 and (rest == "op" or rest.startswith("op.")):
                    return f"{where}.downsamplers.0.conv" + rest[2:]
            elif child == 0:
                return f"{where}.resnets.{pos}.{_resblock(rest, path)}"
            elif child == 1:
                return f"{where}.attentions.{pos}.{rest}"
        else:
            level, pos = divmod(block, n + 1)
            where = f"up_blocks.{level}"
            if child == 0:
                return f"{where}.resnets.{pos}.{_resblock(rest, path)}"
            if rest == "conv" or rest.startswith("conv."):  # Upsample: the only child named 'conv'
                return f"{where}.upsamplers.0.conv" + rest[4:]
            if child == 1:
                return f"{where}.attentions.{pos}.{rest}"
        raise ValueError(f"cannot map UNet path {path!r} to diffusers names (num_res_blocks={n})")
    m = re.fullmatch(r"middle_block\.(\d+)\.(.+)", path)
    if m:
        child, rest = int(m.group(1)), m.group(2)
        if _is_resblock(rest):
            # ResBlock, [SpatialTransformer,] ResBlock: the first is resnets.0, the last resnets.1.
            return f"mid_block.resnets.{0 if child == 0 else 1}.{_resblock(rest, path)}"
        return f"mid_block.attentions.0.{rest}"
    raise ValueError(f"cannot map UNet path {path!r} to diffusers names")


# SD2's OpenCLIP tower -> the CLIPTextModel names that sd-scripts and diffusers convert it to.
_OPEN_CLIP_NAMES = {"attn.out_proj": "self_attn.out_proj", "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2"}


def te_to_hf(path: str) -> str:
    """Our text-encoder path -> transformers' CLIPTextModel path, which is what kohya and diffusers name.

    CLIP-L (SD1) is a transformers CLIPTextModel under 'transformer.', so its paths already contain
    'text_model.encoder.layers.N...'. SD2's OpenCLIP keeps open_clip names
    ('model.transformer.resblocks.N.attn.out_proj', 'mlp.c_fc', 'mlp.c_proj'), which map one to one;
    its packed q/k/v (attn.in_proj_weight) is no module: te_packed_to_hf names its thirds.
    """
    i = path.find("text_model.")
    if i == 0 or (i > 0 and path[i - 1] == "."):
        return path[i:]
    m = re.fullmatch(r"(?:.*\.)?resblocks\.(\d+)\.(attn\.out_proj|mlp\.c_fc|mlp\.c_proj)", path)
    if m:
        return f"text_model.encoder.layers.{m.group(1)}.{_OPEN_CLIP_NAMES[m.group(2)]}"
    raise ValueError(f"cannot map text-encoder path {path!r} to CLIPTextModel names")


def te_packed_to_hf(path: str) -> dict[str, str]:
    """OpenCLIP's attention -> the CLIPTextModel names of the three thirds of its packed in_proj_weight:
    'model.transformer.resblocks.N.attn' -> {'q': 'text_model.encoder.layers.N.self_attn.q_proj', 'k': ..., ...}."""
    m = re.fullmatch(r"(?:.*\.)?resblocks\.(\d+)\.attn", path)
    if not m:
        raise ValueError(f"cannot map {path!r} to CLIPTextModel q/k/v names: not an OpenCLIP attention")
    return {x: f"text_model.encoder.layers.{m.group(1)}.self_attn.{x}_proj" for x in "qkv"}


def diffusers_name(path: str, part: str, num_res_blocks: int | None = None) -> str:
    """Dotted module name inside the diffusers model: 'down_blocks.0...to_q' or 'text_model.encoder...q_proj'."""
    if part == "unet":
        if num_res_blocks is None:
            raise ValueError("num_res_blocks is needed to name UNet modules")
        return unet_to_diffusers(path, num_res_blocks)
    if part in TEXT_PARTS:
        return te_to_hf(path)
    raise ValueError(f"unknown model part {part!r}; expected 'unet' or one of {TEXT_PARTS}")


def kohya_name(path: str, part: str, num_res_blocks: int | None = None, sdxl: bool = False) -> str:
    """The sd-scripts LoRA module name: 'lora_unet_' / 'lora_te_' / 'lora_te1_' / 'lora_te2_' + diffusers name
    with '.' -> '_'; for an SDXL UNet (sdxl=True), our LDM path with '.' -> '_' instead."""
    if part == "unet" and sdxl:
        return kohya_ldm_name(path)
    return KOHYA_PREFIX[part] + diffusers_name(path, part, num_res_blocks).replace(".", "_")


def kohya_ldm_name(path: str) -> str:
    """A UNet path in sd-scripts' spelling of LDM names (its SDXL layout): 'lora_unet_input_blocks_1_1_...'."""
    return KOHYA_PREFIX["unet"] + path.replace(".", "_")
