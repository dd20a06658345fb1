"""What a model weighs and how many tokens a clip makes, read from its configs: each denoiser built on the meta device
(shapes, no storage: a 14B model costs nothing) in the dtype `from_pretrained` loads it in, with the trainer's own fp8
storage (`fp8.store_fp8`) and trainable selection; the VAE's compression and the transformer's patches; the latent
cache's bytes per clip. The memory plan's arithmetic (`vidtune.training.memory_plan`)."""

from __future__ import annotations

import functools
import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from vidtune.training.experts import HIGH, LOW, boundary_ratio
from vidtune.training.families import FAMILIES, ModelFamily, get_family, model_file
from vidtune.training.fp8 import store_fp8
from vidtune.training.offload import PREFETCH, transformer_blocks
from vidtune.training.params import TrainParams
from vidtune.training.published_configs import CONFIG_ROOT, build_from_config

DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# Prompt lengths the families embed (the pipelines' max_sequence_length): Wan pads to 512, Wan 2.1 I2V adds 257 CLIP
# image tokens; CogVideoX's is its transformer's max_text_seq_length.
PROMPT_TOKENS = {"wan": 512, "ltx-video": 128, "cogvideox": 226, "hunyuan-video": 256, "animatediff": 77}
WAN_IMAGE_TOKENS = 257
TEXT_DIM_KEYS = ("text_dim", "caption_channels", "text_embed_dim", "cross_attention_dim")
UNET = "unet"  # the pseudo block list of a UNet denoiser: the whole model, once
BASE_FAMILY = {"wan-i2v": "wan", "ltx-video-i2v": "ltx-video", "animatediff-sdxl": "animatediff"}  # same denoisers


def read_config(model: str, path: str) -> dict | None:
    """A config file of `model`: in a local folder; else the copy vidtune stores for a published hub id
    (`training/model_configs/`); else fetched from the hub (that small file only). None when there is none."""
    folder = Path(model).expanduser()
    if folder.is_dir():
        file = folder / path
        return json.loads(file.read_text()) if file.is_file() else None
    stored = CONFIG_ROOT / model / path
    if stored.is_file():
        return json.loads(stored.read_text())
    file = model_file(model, path)
    return None if file is None else json.loads(file.read_text())


@dataclass(frozen=True)
class ModelInfo:
    """What the plan reads of a model: its family, its denoiser configs (two for Wan 2.2 A14B) and VAE geometry."""

    model: str
    family: ModelFamily
    denoisers: dict[str, dict]  # pipeline attribute -> config
    two_experts: bool
    latent_channels: int
    spatial: int  # VAE compression in height and width
    temporal: int  # VAE compression in time after the first frame; 0: frames encoded one by one
    text_tokens: int
    text_dim: int
    parts: dict[str, dict]  # the other model components' configs (VAE, text encoders), for the bytes they weigh

    @classmethod
    def read(cls, model: str, family: str | ModelFamily | None = None) -> ModelInfo:
        index = _model_index(model)
        family = model_family(model) if family is None else family
        family = get_family(family) if isinstance(family, str) else family
        if index.get("expand_timesteps"):
            raise ValueError(
                f"memory plan: {model} (Wan 2.2 TI2V-5B: a timestep and modulation per token) is not calibrated; its "
                "blocks keep ≈ 1.5 times the activations the Wan 2.1 constants give (measured on the CPU), so the "
                "plan would say it fits where it does not. Set blocks_to_swap by hand"
            )
        two = boundary_ratio(index) is not None
        names = (HIGH, LOW) if two else (family.denoiser_name,)
        denoisers = {name: _denoiser_config(model, name) for name in names}
        vae = read_config(model, "vae/config.json") or {}
        spatial, temporal = _vae_compression(vae, family)
        config = next(iter(denoisers.values()))
        parts = {
            name: part
            for name in ("vae", *family.text_encoders)
            if (part := read_config(model, f"{name}/config.json")) is not None
        }
        return cls(
            model=model,
            family=family,
            denoisers=denoisers,
            two_experts=two,
            latent_channels=vae.get("z_dim") or vae.get("latent_channels") or config.get("out_channels", 4),
            spatial=spatial,
            temporal=temporal,
            text_tokens=_prompt_tokens(family, config),
            text_dim=next((config[key] for key in TEXT_DIM_KEYS if config.get(key)), 0),
            parts=parts,
        )


def _model_index(model: str) -> dict:
    index = read_config(model, "model_index.json")
    if index is None:
        raise ValueError(f"model: {model} is not a diffusers model folder (no model_index.json)")
    return index


def model_family(model: str) -> ModelFamily:
    """The family whose pipeline class the model's model_index.json names (read as `read_config` does)."""
    index = _model_index(model)
    for family in FAMILIES.values():
        if family.pipeline_class_name == index.get("_class_name"):
            return family
    raise ValueError(f"model: {model} is a {index.get('_class_name')}, which no family handles")


def _denoiser_config(model: str, name: str) -> dict:
    config = read_config(model, f"{name}/config.json")
    if config is None:
        raise ValueError(f"model: {model} has no {name}/config.json")
    if config.get("_class_name") == "UNet2DConditionModel":  # an image UNet: AnimateDiff adds its motion adapter
        config = {**config, "_motion_adapter": read_config(model, "motion_adapter/config.json")}
    return config


def _vae_compression(vae: dict, family: ModelFamily) -> tuple[int, int]:
    """(spatial, temporal) compression of the VAE, as its class computes them (built on the meta device)."""
    if not vae:
        return 8, family.temporal_compression
    with torch.device("meta"):
        module = build_from_config(vae)
    computed = vars(module)  # the ratios a class sets in __init__ (not its config's deprecated attribute access)
    spatial = computed.get("spatial_compression_ratio") or 2 ** (len(vae["block_out_channels"]) - 1)
    if family.denoiser_name == UNET:
        return spatial, 0  # AnimateDiff encodes frames one by one
    temporal = vae.get("scale_factor_temporal") or vae.get("temporal_compression_ratio")
    return spatial, temporal or computed.get("temporal_compression_ratio") or family.temporal_compression


def _prompt_tokens(family: ModelFamily, config: dict) -> int:
    base = BASE_FAMILY.get(family.name, family.name)
    tokens = config.get("max_text_seq_length") or PROMPT_TOKENS[base]
    return tokens + (WAN_IMAGE_TOKENS if base == "wan" and config.get("image_dim") else 0)


def build_module(config: dict, dtype: torch.dtype, device: str = "meta") -> torch.nn.Module:
    """The module of `config` on the meta device (shapes only; random weights on another `device`), in `dtype` except
    the modules its class keeps in fp32, as `from_pretrained(dtype=...)` loads it."""
    config = dict(config)
    adapter = config.pop("_motion_adapter", None)
    with torch.device(device):
        module = build_from_config(config)
        if adapter is not None:
            import diffusers

            module = diffusers.UNetMotionModel.from_unet2d(module, build_from_config(adapter))
    return as_loaded(module, dtype)


def as_loaded(module: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """`module` in `dtype`, except the modules its class keeps in fp32, as `from_pretrained(dtype=...)` loads it."""
    keep = set(getattr(module, "_keep_in_fp32_modules", None) or ())
    for name, param in module.named_parameters():
        param.data = param.data.to(torch.float32 if keep & set(name.split(".")) else dtype)
    return module


# ---- shapes and tokens ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Bucket:
    frames: int
    height: int
    width: int

    @classmethod
    def parse(cls, key: str) -> Bucket:
        try:
            frames, height, width = (int(v) for v in key.lower().split("x"))
        except ValueError:
            raise ValueError(f"bucket {key!r}: expected FRAMESxHEIGHTxWIDTH, e.g. 81x480x832") from None
        return cls(frames, height, width)

    @property
    def key(self) -> str:
        return f"{self.frames}x{self.height}x{self.width}"


@dataclass(frozen=True)
class DenoiserShape:
    """The widths and counts the activation formula takes, read from a denoiser built on the meta device."""

    hidden: int  # the residual stream's width (a UNet: its levels' channels weighted by their tokens)
    widths: dict[str, int]  # block list -> feed-forward width
    blocks: dict[str, int]  # block list -> blocks
    lora_layers: dict[str, int]  # block list -> Linears a block has that the LoRA targets
    patch: tuple[int, int, int]
    latent_per_token: int  # latent values one token covers (input channels x patch volume)


@dataclass(frozen=True)
class Grid:
    """One bucket's latents: (channels, frames, height, width), the denoiser's video tokens and the cache's bytes."""

    latent: tuple[int, int, int, int]
    tokens: int
    text_tokens: int


def latent_grid(info: ModelInfo, shape: DenoiserShape, bucket: Bucket) -> Grid:
    """Latent size and token count of one clip: the VAE's compression (time: the first frame kept, the rest /
    `temporal`; AnimateDiff: every frame), then the transformer's patches (a UNet's tokens: latent pixels)."""
    frames = bucket.frames if info.temporal == 0 else (bucket.frames - 1) // info.temporal + 1
    height, width = bucket.height // info.spatial, bucket.width // info.spatial
    pt, ph, pw = shape.patch
    tokens = math.ceil(frames / pt) * (height // ph) * (width // pw)
    text = info.text_tokens * (bucket.frames if info.temporal == 0 else 1)  # AnimateDiff: the prompt per frame
    return Grid((info.latent_channels, frames, height, width), tokens, text)


def cache_bytes(info: ModelInfo, grid: Grid) -> int:
    """One clip's latent cache entry: the latents at 2 bytes (twice: mean and log-variance, where the family caches the
    posterior), plus at most the prompt's embedding (the cache keeps real tokens only: this counts them all)."""
    latents = math.prod(grid.latent) * 2 * (2 if getattr(info.family, "caches_posterior", True) else 1)
    return latents + info.text_tokens * info.text_dim * 2


def _targets(family: ModelFamily, params: TrainParams):
    from peft import LoraConfig
    from peft.tuners.tuners_utils import check_target_module_exists

    config = LoraConfig(r=params.rank, target_modules=params.lora_targets or list(family.default_lora_targets))
    return lambda name: bool(check_target_module_exists(config, name))


def _lists(module: torch.nn.Module, family: ModelFamily) -> dict[str, list[torch.nn.Module]]:
    if not family.block_lists:
        return {UNET: [module]}
    return {name: list(getattr(module, name)) for name in family.block_lists}


def denoiser_shape(config: dict, family: ModelFamily, params: TrainParams) -> DenoiserShape:
    targets = params.lora_targets if params.training_type == "lora" else None
    targets = targets if isinstance(targets, str | None) else tuple(targets)
    return _denoiser_shape(json.dumps(config, sort_keys=True), family.name, params.training_type, targets)


@functools.lru_cache(maxsize=32)
def _denoiser_shape(config_json: str, family_name: str, training_type: str, targets) -> DenoiserShape:
    config, family = json.loads(config_json), get_family(family_name)
    params = TrainParams(
        training_type=training_type, lora_targets=list(targets) if isinstance(targets, tuple) else targets
    )
    module = build_module(config, torch.bfloat16)
    lists = _lists(module, family)
    targets = _targets(family, params)
    lora = {
        name: sum(isinstance(m, torch.nn.Linear) and targets(n) for n, m in blocks[0].named_modules())
        if params.training_type == "lora"
        else 0
        for name, blocks in lists.items()
    }
    if not family.block_lists:
        channels = config["block_out_channels"]
        hidden = round(sum(c / 4**level for level, c in enumerate(channels)))
        return DenoiserShape(hidden, {UNET: 0}, {UNET: 1}, lora, (1, 1, 1), config["in_channels"])
    patch = config.get("patch_size", 1)
    pt, ph, pw = patch if isinstance(patch, list) else (config.get("patch_size_t") or 1, patch, patch)
    hidden = config["num_attention_heads"] * config["attention_head_dim"]
    widths = {name: _ffn_width(blocks[0], hidden) for name, blocks in lists.items()}
    blocks = {name: len(blocks) for name, blocks in lists.items()}
    return DenoiserShape(hidden, widths, blocks, lora, (pt, ph, pw), config["in_channels"] * pt * ph * pw)


def _ffn_width(block: torch.nn.Module, hidden: int) -> int:
    """A block's feed-forward width: its first feed-forward projection's outputs (4 x hidden when none is found)."""
    for name, module in block.named_modules():
        if isinstance(module, torch.nn.Linear) and (name.endswith("net.0.proj") or name.endswith("proj_mlp")):
            return module.out_features
    return 4 * hidden


# ---- weights -----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Weights:
    """One denoiser at one setting: frozen bytes of each block (forward order) and of the rest, trained parameters,
    and the bytes of fp8 weights' dequantised copies (made in forward, kept for backward) per block and outside."""

    blocks: tuple[int, ...]
    outside: int
    trained: int
    dequantised: tuple[int, ...]
    dequantised_outside: int

    def device_bytes(self, swapped: int) -> int:
        """Frozen bytes on the device with the first `swapped` blocks swapped (PREFETCH + 1 of them resident)."""
        window = max((sum(self.blocks[i : min(i + PREFETCH + 1, swapped)]) for i in range(swapped)), default=0)
        return self.outside + sum(self.blocks[swapped:]) + window

    def host_bytes(self, swapped: int) -> int:
        return sum(self.blocks[:swapped])


@functools.lru_cache(maxsize=32)
def _weights(config_json: str, family_name: str, settings_json: str, dtype_name: str) -> Weights:
    config, family = json.loads(config_json), get_family(family_name)
    params = TrainParams.model_validate_json(settings_json, context={"remote": True})
    dtype = DTYPES[dtype_name]
    module = build_module(config, dtype)
    store_fp8(module, params.fp8, family.block_lists, dtype)  # the trainer's own: exact bytes and scales
    trained_ids: set[int] = set()
    trained = 0
    if params.training_type == "lora":
        targets = _targets(family, params)
        for name, layer in module.named_modules():
            if isinstance(layer, torch.nn.Linear) and targets(name):
                trained += params.rank * (layer.in_features + layer.out_features)
    else:
        from vidtune.training.trainable import select_trainable

        pattern = family.full_subsets.get(params.full_modules, params.full_modules) if params.full_modules else None
        chosen = select_trainable(module, pattern)
        trained_ids = {id(p) for p in chosen}
        trained = sum(p.numel() for p in chosen)
    itemsize = torch.tensor([], dtype=dtype).element_size()

    def frozen(part: torch.nn.Module) -> tuple[int, int]:
        params_ = [p for p in part.parameters() if id(p) not in trained_ids]
        stored = sum(p.numel() * p.element_size() for p in params_)
        return stored, sum(p.numel() * itemsize for p in params_ if p.element_size() == 1)  # fp8: a copy per use

    blocks = [frozen(block) for block in transformer_blocks(module, family.block_lists)]
    total = frozen(module)
    return Weights(
        blocks=tuple(b[0] for b in blocks),
        outside=total[0] - sum(b[0] for b in blocks),
        trained=trained,
        dequantised=tuple(b[1] for b in blocks),
        dequantised_outside=total[1] - sum(b[1] for b in blocks),
    )


def denoiser_weights(config: dict, family: ModelFamily, params: TrainParams, dtype_name: str) -> Weights:
    settings = params.model_dump_json(include={"training_type", "rank", "lora_targets", "full_modules", "fp8"})
    return _weights(json.dumps(config, sort_keys=True), family.name, settings, dtype_name)


def module_bytes(config: dict, dtype_name: str) -> int:
    """A model component's bytes in `dtype` (VAE, text encoders), from its config."""
    return _module_bytes(json.dumps(config, sort_keys=True), dtype_name)


@functools.lru_cache(maxsize=32)
def _module_bytes(config_json: str, dtype_name: str) -> int:
    module = build_module(json.loads(config_json), DTYPES[dtype_name])
    return sum(p.numel() * p.element_size() for p in module.parameters())
