"""The latent and text cache: curated shards in, per-(fingerprint, bucket) shards of VAE latents and
prompt embeddings out. Training reads these instead of decoding and encoding video every step.

Layout: `CACHE/<fingerprint>/<frames>x<height>x<width>/cache-000000.tar`, members
`{clip_id}.latents.safetensors` (`moments`, the VAE posterior's, from which each step draws a fresh sample; or
`mean`, for a family that trains on the mean: `ModelFamily.caches_posterior`),
`{clip_id}.text.safetensors` (prompt embeddings up to the last real token, the attention mask when the family has
one, and `tokens`, the length the model takes: the rest is padding, put back when read) and, for a family
that conditions on more than these (Wan image-to-video: the first frame's latents and CLIP image tokens),
`{clip_id}.condition.safetensors`; and
`CACHE/<fingerprint>/prompts/<sha>.safetensors`, the validation prompts' embeddings and the empty negative
prompt's, so training never loads the text encoder. The fingerprint
covers the model's VAE and text-encoder configs, the family and the preprocessing, so a cache made for another
model or setting is never mixed in. Shards are append-only and written atomically, like curated shards: a
second run reuses what is there and encodes only clips that are new.
"""

from __future__ import annotations

import hashlib
import json
import tarfile
import zlib
from collections import Counter, OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import webdataset as wds
from pydantic import BaseModel, ConfigDict, Field
from safetensors.torch import load_file, save_file
from safetensors.torch import save as save_tensors

from vidtune.training.families import ModelFamily, TextEmbeddings
from vidtune.training.files import atomic_path
from vidtune.training.shard_index import SampleReader, index_shard

CACHE_VERSION = 1  # bump when what is stored changes for every family (one family's change: its cache_revision)


class PrecomputeParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    frame_buckets: list[int] | None = Field(
        None, description="Clip lengths (frames) to cache; a clip takes the longest that fits. Default: family's."
    )
    vae_slicing: bool = Field(True, description="Encode one video of a batch at a time (bounded memory).")
    vae_tiling: bool = Field(False, description="Encode in spatial tiles (for large frames on small GPUs).")
    clips_per_shard: int = Field(256, ge=1, description="Cache entries per shard.")


PROMPT_MEMO = 64  # distinct captions whose embeddings precompute keeps (Wan's are 4 MiB each)
STILL_FRAMES = 1  # the bucket of stills (curated images): a video never trains as its first frame alone


def frame_buckets(family: ModelFamily, params: PrecomputeParams) -> list[int]:
    """The clip lengths to cache, shortest first: the configured ones the family's VAE takes, else the family's;
    and 1 for stills when its VAE takes a single frame."""
    lengths = {*(params.frame_buckets or family.frame_buckets), STILL_FRAMES}
    return sorted(b for b in lengths if family.valid_num_frames(b))


@dataclass
class PrecomputeResult:
    cache_dir: Path
    prompts_dir: Path | None = None  # validation prompts' embeddings
    encoded: int = 0
    reused: int = 0
    videos_read: int = 0  # clips whose MP4 was read (a cached clip's is not)
    prompts_encoded: int = 0  # text-encoder runs: one per distinct caption (of the last PROMPT_MEMO)
    skipped: Counter = field(default_factory=Counter)  # reason -> clips

    COUNTS = ("encoded", "reused", "videos_read", "prompts_encoded")  # what adds up over precompute processes

    @property
    def finished(self) -> int:
        """Clips looked at and done with: encoded, reused or skipped."""
        return self.encoded + self.reused + sum(self.skipped.values())


def load_encoders(family: ModelFamily, model: str, dtype: torch.dtype, device) -> object:
    """The pipeline precompute encodes with: the VAE and the text (and image) encoders on `device`. The denoisers'
    weights are not loaded (Wan 2.2 A14B's two are 57 GB, and each precompute process would hold them); where the
    family's encoding reads their config, they are built from it on the meta device (no memory)."""
    if family.precompute_reads_denoiser:
        denoisers = _denoiser_shells(family, model, dtype)
    else:
        denoisers = dict.fromkeys(family.denoiser_components)
    pipe = family.load_pipeline(model, dtype=dtype, **denoisers)
    for name, component in pipe.components.items():
        if isinstance(component, torch.nn.Module) and name not in family.denoiser_components:
            component.to(device)
    return pipe


def _denoiser_shells(family: ModelFamily, model: str, dtype: torch.dtype) -> dict[str, torch.nn.Module | None]:
    """The model's denoisers built from their configs on the meta device: their config without their weights."""
    import diffusers

    from vidtune.training.families import model_index

    index, shells = model_index(model), {}
    for name in family.denoiser_components:
        _, class_name = index.get(name) or (None, None)
        if class_name is None:
            shells[name] = None  # the model has no such component (Wan 2.1's second expert)
            continue
        cls = getattr(diffusers, class_name)
        with torch.device("meta"):
            shells[name] = cls.from_config(cls.load_config(model, subfolder=name)).to(dtype)
    return shells


def cache_fingerprint(family: ModelFamily, pipe, model: str) -> str:
    """Hash of what determines the cached tensors: the encoders' configs and weight files, the family and the
    cache version. Weight files count by name, size and modification time (hashing gigabytes would cost minutes)."""
    weights = []
    for part in ("vae", "text_encoder", "image_encoder"):
        folder = Path(model) / part
        if folder.is_dir():
            weights += [(f"{part}/{f.name}", f.stat().st_size, f.stat().st_mtime_ns) for f in sorted(folder.iterdir())]
    parts = {
        "version": CACHE_VERSION,
        "family": family.name,
        "model": str(model),
        "vae": dict(pipe.vae.config),
        "dtype": str(pipe.vae.dtype),
        "text_encoder": pipe.text_encoder.config.to_dict(),
        "weights": weights,
    }
    # Only when set, so that the caches of families without them keep their fingerprint:
    if getattr(pipe, "image_encoder", None) is not None:
        parts["image_encoder"] = pipe.image_encoder.config.to_dict()
    if family.cache_revision:
        parts["family_revision"] = family.cache_revision
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def choose_bucket(num_frames: int, buckets: list[int]) -> int | None:
    """The longest bucket that fits in the clip (clips are cut to it), or None when the clip is too short. The
    1-frame bucket takes stills only."""
    fitting = [b for b in buckets if b <= num_frames and (b != STILL_FRAMES or num_frames == STILL_FRAMES)]
    return max(fitting) if fitting else None


def _skip_reason(num_frames: int, buckets: list[int], family: ModelFamily) -> str:
    if num_frames == STILL_FRAMES:
        why = "its VAE takes none" if not family.image_conditioned else "a still is its own conditioning image"
        return f"stills: {family.title} trains on no single frame ({why})"
    shortest = min(b for b in buckets if b != STILL_FRAMES)
    return f"shorter than every bucket ({num_frames} < {shortest} frames)"


def _cached_ids(bucket_dir: Path) -> set[str]:
    ids = set()
    for shard in sorted(bucket_dir.glob("cache-*.tar")):
        with tarfile.open(shard) as tar:
            ids.update(name.split(".", 1)[0] for name in tar.getnames())
    return ids


def decode_clip(mp4: bytes, frames: int) -> torch.Tensor:
    """The first `frames` frames of a clip as (1, 3, frames, h, w) in [-1, 1]."""
    from vidtune.training.media import FrameReader

    array = FrameReader(mp4).get(list(range(frames)))
    video = torch.from_numpy(array).permute(3, 0, 1, 2).float() / 127.5 - 1.0
    return video.unsqueeze(0)


class _ShardAppender:
    """Appends samples to `cache-NNNNNN{suffix}.tar` shards of a bucket, each written atomically (`suffix`: the
    writing process's, where several write at once)."""

    def __init__(self, bucket_dir: Path, per_shard: int, suffix: str = ""):
        self.dir, self.per_shard, self.suffix = bucket_dir, per_shard, suffix
        self.pending: list[dict] = []
        existing = [int(p.stem.split("-")[1]) for p in bucket_dir.glob("cache-*.tar")]
        self.next_index = max(existing, default=-1) + 1

    def add(self, sample: dict) -> None:
        self.pending.append(sample)
        if len(self.pending) >= self.per_shard:
            self.flush()

    def flush(self) -> None:
        if not self.pending:
            return
        with (
            atomic_path(self.dir / f"cache-{self.next_index:06d}{self.suffix}.tar") as tmp,
            open(tmp, "wb") as stream,
            wds.TarWriter(stream, mtime=0) as writer,
        ):
            for sample in self.pending:
                writer.write(sample)
        self.next_index += 1
        self.pending = []


def _text_tensors(text: TextEmbeddings) -> dict[str, torch.Tensor]:
    """One prompt's embeddings as named tensors (batch dimension dropped), cut after the last real token: the rows
    after it are padding that is zeros (Wan's pipelines pad so) or masked out (LTX-Video's, HunyuanVideo's), which
    `padded_text` puts back as zeros with mask 0. Where the padding is neither (CogVideoX's and CLIP's pad tokens are
    encoded and attended to), nothing is cut. `tokens` keeps the length the model takes."""
    embeds, mask = text.embeds[0], None if text.mask is None else text.mask[0]
    real = mask.bool() if mask is not None else embeds.ne(0).any(dim=-1)
    kept = max(int(real.nonzero().max()) + 1 if real.any() else 0, 1)
    tensors = {"embeds": embeds[:kept].contiguous(), "tokens": torch.tensor(embeds.shape[0])}
    if mask is not None:
        tensors["mask"] = mask[:kept].contiguous()
    if text.pooled is not None:
        tensors["pooled"] = text.pooled[0].contiguous()
    return tensors


def padded_text(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Cached prompt tensors at the length the model takes: the cut padding back as zero rows (mask 0). Caches made
    before prompts were cut have no `tokens` and are returned as they are."""
    tensors = dict(tensors)
    tokens = tensors.pop("tokens", None)
    if tokens is None:
        return tensors
    missing = int(tokens) - tensors["embeds"].shape[0]
    for name in ("embeds", "mask"):
        if name in tensors and missing > 0:
            tensor = tensors[name]
            tensors[name] = torch.cat([tensor, tensor.new_zeros((missing, *tensor.shape[1:]))])
    return tensors


def prompt_file(prompts_dir: Path, prompt: str) -> Path:
    return Path(prompts_dir) / f"{hashlib.sha256(prompt.encode()).hexdigest()[:20]}.safetensors"


def _with_negative(prompts: list[str]) -> list[str]:
    return list(dict.fromkeys([*prompts, ""]))  # "" : the negative prompt classifier-free guidance uses


def cache_prompts(family: ModelFamily, pipe, prompts: list[str], prompts_dir: Path) -> Path:
    """Embed `prompts` and the empty negative prompt (zeros where the pipeline uses zeros for it, as SDXL's
    does) into `prompts_dir`, skipping those already there. Each file is written atomically."""
    prompts_dir.mkdir(parents=True, exist_ok=True)
    for prompt in _with_negative(prompts):
        path = prompt_file(prompts_dir, prompt)
        if path.is_file():
            continue
        tensors = _text_tensors(family.encode_prompts(pipe, [prompt]))
        if prompt == "" and pipe.config.get("force_zeros_for_empty_prompt"):
            tensors = {name: torch.zeros_like(t) if t.is_floating_point() else t for name, t in tensors.items()}
        with atomic_path(path) as tmp:
            save_file({k: v.cpu() for k, v in tensors.items()}, tmp, metadata={"prompt": prompt})
    return prompts_dir


def check_cached_prompts(prompts_dir: Path, prompts: list[str]) -> None:
    """Before training starts: every validation prompt (and the negative one) must have a cached embedding."""
    missing = [p for p in _with_negative(prompts) if not prompt_file(prompts_dir, p).is_file()]
    if missing:
        raise ValueError(
            f"validation.prompts: {missing} have no cached embedding in {prompts_dir}; run precompute with them "
            f"(vidtune finetune does) or set data_source=shards"
        )


def load_prompt(prompts_dir: Path, prompt: str) -> TextEmbeddings:
    """A cached prompt's embeddings with a batch dimension of 1."""
    path = prompt_file(prompts_dir, prompt)
    if not path.is_file():
        raise FileNotFoundError(
            f"validation prompt {prompt!r} has no cached embedding in {prompts_dir}; rerun precompute with it"
        )
    tensors = {name: t.unsqueeze(0) for name, t in padded_text(load_file(path)).items()}
    return TextEmbeddings(tensors["embeds"], tensors.get("mask"), tensors.get("pooled"))


def precompute(
    shards: list[str],
    family: ModelFamily,
    pipe,
    model: str,
    cache_root: Path,
    params: PrecomputeParams,
    on_clip: Callable[[int], None] | None = None,
    prompts: list[str] = (),
    rank: int = 0,
    world: int = 1,
) -> PrecomputeResult:
    """Encode every curated clip not cached yet for this fingerprint, and the validation `prompts`; count what is
    skipped and why. `on_clip(n)` is told how many clips this process has finished so far (encoded, or reused and
    skipped).

    With `world` > 1, one of `world` processes started together on the same shards (`precompute_processes`): each
    takes the clips whose id hashes to its `rank` (so no process reads what another writes) and writes shards named
    after its rank; rank 0 also embeds the prompts. The processes' results add up."""
    if params.vae_slicing and hasattr(pipe.vae, "enable_slicing"):
        pipe.vae.enable_slicing()
    if params.vae_tiling and hasattr(pipe.vae, "enable_tiling"):
        pipe.vae.enable_tiling()
    buckets = frame_buckets(family, params)
    result = PrecomputeResult(cache_root / cache_fingerprint(family, pipe, model))
    result.prompts_dir = result.cache_dir / "prompts"
    if rank == 0:
        cache_prompts(family, pipe, list(prompts), result.prompts_dir)
    report = on_clip or (lambda done: None)
    files, prompts_seen = SampleReader(), OrderedDict()

    def encoded_text(caption: str) -> bytes:
        """The caption's embeddings, encoded once for clips that share it (most recent PROMPT_MEMO kept)."""
        if caption in prompts_seen:
            prompts_seen.move_to_end(caption)
            return prompts_seen[caption]
        tensors = {name: t.cpu() for name, t in _text_tensors(family.encode_prompts(pipe, [caption])).items()}
        result.prompts_encoded += 1
        prompts_seen[caption] = save_tensors(tensors, metadata={"caption": caption})
        if len(prompts_seen) > PROMPT_MEMO:
            prompts_seen.popitem(last=False)
        return prompts_seen[caption]

    # Look through the tar headers and each clip's metadata (its MP4 is read only when it must be encoded).
    todo, cached = [], {}
    for shard in shards:
        for clip_key, indexed in index_shard(shard).items():
            if world > 1 and zlib.crc32(clip_key.encode()) % world != rank:
                continue  # another process's clip
            meta = json.loads(files.read(indexed, {"json"})["json"])
            frames = choose_bucket(meta["num_frames"], buckets)
            if frames is None:
                result.skipped[_skip_reason(meta["num_frames"], buckets, family)] += 1
                continue
            key = f"{frames}x{meta['height']}x{meta['width']}"
            if key not in cached:
                (result.cache_dir / key).mkdir(parents=True, exist_ok=True)
                cached[key] = _cached_ids(result.cache_dir / key)
            if meta["clip_id"] in cached[key]:
                result.reused += 1
            else:
                todo.append((indexed, meta, frames, key))
                cached[key].add(meta["clip_id"])  # a clip in two shards is encoded once
    done = result.finished
    report(done)
    appenders: dict[str, _ShardAppender] = {}
    for indexed, meta, frames, key in todo:
        video = decode_clip(files.read(indexed, {"mp4"})["mp4"], frames)
        result.videos_read += 1
        latents = family.encode_video(pipe, video)[0].contiguous().cpu()  # the video went to the VAE's device
        entry = {
            "__key__": meta["clip_id"],
            "latents.safetensors": save_tensors(
                {"moments" if family.caches_posterior else "mean": latents},
                metadata={"clip_id": meta["clip_id"], "frames": str(frames)},
            ),
            "text.safetensors": encoded_text(meta["caption"]),
        }
        condition = family.encode_condition(pipe, video)
        if condition:
            entry["condition.safetensors"] = save_tensors({k: v[0].contiguous().cpu() for k, v in condition.items()})
        if key not in appenders:
            suffix = f"-{rank}" if world > 1 else ""
            appenders[key] = _ShardAppender(result.cache_dir / key, params.clips_per_shard, suffix)
        appenders[key].add(entry)
        result.encoded += 1
        done += 1
        report(done)
    for appender in appenders.values():
        appender.flush()
    files.close()
    return result


def load_cache_entry(sample: dict) -> dict:
    """A cache sample's tensors: `latents` (`encode_video`'s: posterior moments, or the mean), `text` (name ->
    tensor, padded to the length the model takes) and `condition` (name -> tensor; empty for families that cache
    none)."""
    from safetensors.torch import load

    condition = sample.get("condition.safetensors")
    (latents,) = load(sample["latents.safetensors"]).values()
    return {
        "latents": latents,
        "text": padded_text(load(sample["text.safetensors"])),
        "condition": load(condition) if condition is not None else {},
    }
