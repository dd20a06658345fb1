"""LTX-Video image-to-video (`LTXImageToVideoPipeline` on the same `Lightricks/LTX-Video` checkpoint): the video
continues a given first frame. The checkpoint's model_index.json names LTXPipeline, so this family is chosen with
`family: ltx-video-i2v`; LTXImageToVideoPipeline takes exactly LTXPipeline's components.

Training conditions as the pipeline samples: latent frame 0 is the clean latent of the clip's own first frame with
timestep 0, the later frames are noised at t, and the loss covers the later frames only. LTX's VAE is causal and
keeps the first pixel frame alone in the first latent frame, so the cached clip latents already hold the
conditioning image's latent: no extra cache entry."""

from __future__ import annotations

from vidtune.training.families.ltx import LtxFamily
from vidtune.training.families.objectives import FirstFrameConditioned, ObjectiveParams


class LtxImageToVideoFamily(LtxFamily):
    name = "ltx-video-i2v"
    title = "LTX-Video image-to-video"
    pipeline_class_name = "LTXImageToVideoPipeline"
    image_conditioned = True
    tiny_models = {"ltx-video-i2v": LtxFamily.tiny_models["ltx-video"]}  # the same checkpoint, so the same configs

    def valid_num_frames(self, frames: int) -> bool:
        """Not a still: its only latent frame is the conditioning frame, so nothing would be learned."""
        return frames > 1 and LtxFamily.valid_num_frames(self, frames)  # also called on the class, when defined

    def objective(self, pipe, params: ObjectiveParams | None = None) -> FirstFrameConditioned:
        return FirstFrameConditioned(super().objective(pipe, params))
