"""Wan image-to-video (`WanImageToVideoPipeline`): the video continues a given first frame. The checkpoints condition
in one of two ways, read from the loaded model (as the pipeline reads them):

- channel concat (Wan 2.1 I2V 14B, Wan 2.2 I2V-A14B): the transformer takes 36 channels, the 16 noisy ones, a
  4-channel mask (1 on latent frame 0) and the 16-channel latents of the video [first frame, grey frames...]
  encoded by the VAE (its mode); Wan 2.1 also attends to CLIP image tokens (the image encoder's penultimate layer,
  put before the 512 text tokens). That video is not the clip, so precompute encodes it once more, beside the
  clip, and caches it with the CLIP tokens (`encode_condition`). Every latent frame is denoised and scored, as the
  pipeline steps every frame.
- first-frame replacement (Wan 2.2 TI2V-5B, `expand_timesteps`): latent frame 0 is the clean latent of the first
  frame, its tokens get timestep 0, and the loss covers the later frames (the pipeline puts frame 0 back after
  sampling). The Wan VAE is causal, so that latent is frame 0 of the clip's cached latents: nothing more is cached.
  The 5B's model_index.json names WanPipeline: name this family to train it from images.

Wan 2.2 I2V-A14B has two experts, switched at its `boundary_ratio` 0.9; `experts` works as for text-to-video."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import torch

from vidtune.training.families.base import TextEmbeddings, TrainingInputs, model_file
from vidtune.training.families.objectives import FirstFrameConditioned, ObjectiveParams
from vidtune.training.families.wan import TRANSFORMER_SHRINK, WanFamily, _tiny
from vidtune.training.published_configs import Part

WAN21_I2V, WAN22_I2V = "Wan-AI/Wan2.1-I2V-14B-480P-Diffusers", "Wan-AI/Wan2.2-I2V-A14B-Diffusers"
IMAGE = 32  # the tiny image encoder's width (ViT-H/14's 1280); its 224 px input and 14 px patches stay as published
CLIP_VISION_SHRINK = {
    "hidden_size": IMAGE,
    "intermediate_size": 37,
    "num_attention_heads": 4,
    "num_hidden_layers": 2,
    "projection_dim": IMAGE,
}
# image tokens -> the attention's added key/value projections (published: 1280 -> 5120, the attention width)
IMAGE_BRANCH_SHRINK = {
    "image_dim": IMAGE,
    "added_kv_proj_dim": TRANSFORMER_SHRINK["num_attention_heads"] * TRANSFORMER_SHRINK["attention_head_dim"],
}


def _tiny_wan21_i2v():
    spec = _tiny(WAN21_I2V, transformer_shrink={**TRANSFORMER_SHRINK, **IMAGE_BRANCH_SHRINK})
    return replace(
        spec,
        parts={**spec.parts, "image_encoder": Part(WAN21_I2V, "image_encoder", CLIP_VISION_SHRINK)},
        processors={"image_processor": Part(WAN21_I2V, "image_processor")},
    )


class WanImageToVideoFamily(WanFamily):
    precompute_reads_denoiser = True  # the image conditioning follows the transformer's config
    name = "wan-i2v"
    title = "Wan image-to-video"
    pipeline_class_name = "WanImageToVideoPipeline"
    image_conditioned = True
    # Wan 2.1's image-token keys and values too (absent in Wan 2.2's experts; ComfyUI names them k_img, v_img): what
    # an image-to-video LoRA adapts, and what diffusers otherwise fills with zeros when it loads one.
    default_lora_targets = (*WanFamily.default_lora_targets, "add_k_proj", "add_v_proj")
    tiny_models = {
        "wan-i2v": _tiny_wan21_i2v(),  # Wan 2.1 I2V 14B-480P's configs: CLIP image tokens and the channel concat
        "wan2.2-i2v-a14b": _tiny(WAN22_I2V, experts=("transformer", "transformer_2")),  # concat, no CLIP, 2 experts
    }

    def valid_num_frames(self, frames: int) -> bool:
        """Not a still: a one-frame clip is its own conditioning image, so nothing would be learned."""
        return frames > 1 and WanFamily.valid_num_frames(self, frames)  # also called on the class, when defined

    def check_model(self, model: str) -> None:
        """Also refuse a text-to-video Wan (as many input channels as output ones, and no `expand_timesteps`): it has
        no way to take the image. Local folders and hub ids alike (their two small config files)."""
        super().check_model(model)
        file, index = model_file(model, "transformer/config.json"), model_file(model, "model_index.json")
        if file is None or index is None:
            return
        transformer = json.loads(file.read_text())
        if not json.loads(index.read_text()).get("expand_timesteps") and (
            transformer["in_channels"] == transformer["out_channels"]
        ):
            raise ValueError(
                f"model: {model} is a text-to-video Wan (its transformer takes {transformer['in_channels']} channels, "
                "no image latents); the wan-i2v family needs an image-to-video checkpoint (Wan2.1-I2V-14B-480P, "
                "Wan2.2-I2V-A14B) or Wan2.2-TI2V-5B; or train it with family wan"
            )

    def encode_condition(self, pipe, video: torch.Tensor) -> dict[str, torch.Tensor]:
        """Channel concat: `latent_condition`, the normalised VAE mode of [first frame, grey (0) frames...] as the
        pipeline builds it, and, when the transformer has an image branch, `image_embeds`, the image encoder's
        penultimate hidden states of the first frame. First-frame replacement: nothing (it is in the clip latents)."""
        if pipe.config.get("expand_timesteps"):
            return {}
        with torch.no_grad():
            padded = torch.cat([video[:, :, :1], torch.zeros_like(video[:, :, 1:])], dim=2)
            mode = pipe.vae.encode(padded.to(pipe.vae.device, pipe.vae.dtype)).latent_dist.mode().float()
            shift, scale = self._normalisation(pipe, mode)
            condition = {"latent_condition": (mode - shift) / scale}  # in float32, as the pipeline normalises it
            if pipe.transformer.config.image_dim is not None:
                pixels = ((video[:, :, 0].permute(0, 2, 3, 1).float().cpu() + 1) * 127.5).round().clamp(0, 255)
                frames = [frame.numpy().astype(np.uint8) for frame in pixels]
                condition["image_embeds"] = pipe.encode_image(frames, device=pipe.image_encoder.device)
        return condition

    def objective(self, pipe, params: ObjectiveParams | None = None):
        base = super().objective(pipe, params)
        return FirstFrameConditioned(base) if pipe.config.get("expand_timesteps") else base

    def _forward(self, pipe, denoiser, inputs: TrainingInputs, text: TextEmbeddings) -> torch.Tensor:
        if pipe.config.get("expand_timesteps"):  # per-frame timesteps, 0 on the clean frame 0: WanFamily's path
            return super()._forward(pipe, denoiser, inputs, text)
        if "latent_condition" not in inputs.condition:
            raise ValueError(
                f"{self.name}: this batch has no conditioning latents; precompute the cache again "
                "(a cache made before image-to-video conditioning, or for another family)"
            )
        latent_condition = inputs.condition["latent_condition"]
        mask = torch.zeros_like(latent_condition[:, :4])  # the pipeline's mask: 1 on latent frame 0 (4 pixel slots)
        mask[:, :, 0] = 1
        hidden = torch.cat([inputs.noisy, mask, latent_condition], dim=1)
        return denoiser(
            hidden_states=hidden.to(inputs.noisy.dtype),
            timestep=inputs.timesteps,
            encoder_hidden_states=text.embeds,
            encoder_hidden_states_image=inputs.condition.get("image_embeds"),
            return_dict=False,
        )[0]
