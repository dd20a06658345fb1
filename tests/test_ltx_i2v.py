"""LTX-Video image-to-video (`ltx-video-i2v`) beyond the shared family suite: it loads the text-to-video checkpoint
when chosen by name, trains from the cached clip latents (their first latent frame is the first frame's), and its
pipeline starts the video from the conditioning image."""

from __future__ import annotations

import pytest
import torch

from tests.test_families import FRAMES, _image, _video
from vidtune.training.families import detect_family, get_family
from vidtune.training.tiny_models import build_tiny

I2V, T2V = get_family("ltx-video-i2v"), get_family("ltx-video")


@pytest.fixture(scope="module")
def ltx_folder(tmp_path_factory):
    """The tiny LTX-Video checkpoint: model_index.json names LTXPipeline, as the published one does."""
    return build_tiny("ltx-video", tmp_path_factory.mktemp("ltx") / "model")


def test_the_text_to_video_checkpoint_loads_as_image_to_video_when_the_family_is_named(ltx_folder):
    from vidtune.tasks.finetune_tasks import resolve_family_task

    assert detect_family(ltx_folder) is T2V  # detection follows model_index.json
    assert resolve_family_task.fn(str(ltx_folder), "ltx-video-i2v") == "ltx-video-i2v"  # the family parameter wins
    assert type(I2V.load_pipeline(str(ltx_folder))).__name__ == "LTXImageToVideoPipeline"


def test_the_first_latent_frame_of_a_clip_is_its_first_frame_encoded_alone(ltx_folder):
    """LTX's causal VAE: the cached clip latents already hold the conditioning image's latent."""
    pipe = I2V.load_pipeline(str(ltx_folder))
    video = _video(frames=17, size=64)
    clip, first = I2V.encode_video(pipe, video), I2V.encode_video(pipe, video[:, :, :1])
    assert clip.shape[2] == 3 and first.shape[2] == 1
    assert torch.allclose(clip[:, :, :1], first, atol=1e-5 * first.abs().max().item())
    other = I2V.encode_video(pipe, _video(frames=1, size=64, seed=1))
    assert not torch.allclose(clip[:, :, :1], other, atol=1e-2)  # the check can tell frames apart


def _first_latent_frame(pipe, family, image=None) -> torch.Tensor:
    """The generated video's first latent frame (normalised, as the transformer sees it)."""
    packed = pipe(
        prompt="a red car in sks style",
        num_frames=FRAMES,
        height=64,
        width=64,
        num_inference_steps=2,
        guidance_scale=1.0,
        output_type="latent",
        generator=torch.Generator().manual_seed(0),
        **family.sampling_arguments(image),
    ).frames
    per_frame = (64 // pipe.vae_spatial_compression_ratio) ** 2
    return packed[:, :per_frame]


def _image_latent(pipe, image) -> torch.Tensor:
    """The image as the model's latent, packed into tokens: a posterior sample (the tiny random VAE's posterior is
    wide, std ~1, so its mean alone is no target) drawn from the seed generation uses."""
    moments = I2V.encode_video(pipe, pipe.video_processor.preprocess(image, 64, 64).unsqueeze(2))
    return pipe._pack_latents(I2V.sample_latents(pipe, moments, torch.Generator().manual_seed(0)), 1, 1)


def test_generation_from_an_image_starts_from_that_image(ltx_folder):
    """A random tiny VAE's decoder does not reproduce images, so the first frame is compared where the model works:
    the generated first latent frame is the image's latent, not another image's and not what text-to-video makes."""
    pipe = I2V.load_pipeline(str(ltx_folder))
    image, other = _image(0, size=64), _image(1, size=64)
    generated = _first_latent_frame(pipe, I2V, image)
    target = _image_latent(pipe, image)
    assert torch.allclose(generated, target, atol=1e-4)
    from_text = _first_latent_frame(T2V.load_pipeline(str(ltx_folder)), T2V)
    assert (generated - _image_latent(pipe, other)).abs().max() > 0.1
    assert (from_text - target).abs().max() > 0.1


def test_image_is_required_by_image_to_video_and_refused_by_text_to_video():
    with pytest.raises(
        ValueError,
        match=r"image: LTX-Video image-to-video \(ltx-video-i2v\) generates from a conditioning image.*--image PATH",
    ):
        I2V.sampling_arguments(None)
    with pytest.raises(ValueError, match=r"image: LTX-Video \(ltx-video\) generates from text only.*ltx-video-i2v"):
        T2V.sampling_arguments(_image())
    assert T2V.sampling_arguments(None) == {} and "image" in I2V.sampling_arguments(_image())


def test_training_loss_leaves_out_the_conditioning_frame(ltx_folder):
    """The trainer's loss on a cached batch: what the transformer predicts for frame 0 does not count."""
    from vidtune.training.trainer import batch_loss

    pipe = I2V.load_pipeline(str(ltx_folder))
    text = I2V.encode_prompts(pipe, ["a red car"])
    batch = {"moments": I2V.encode_video(pipe, _video(size=64)), "text": {"embeds": text.embeds, "mask": text.mask}}
    frame_zero = (64 // 32) ** 2  # tokens of latent frame 0

    def loss_with_frame_zero_shifted(shift: float) -> float:
        def hook(module, args, output):
            output[0][:, :frame_zero] += shift
            return output

        handle = pipe.transformer.register_forward_hook(hook)
        try:
            torch.manual_seed(0)
            return batch_loss(I2V, pipe, None, batch, torch.float32).item()
        finally:
            handle.remove()

    assert loss_with_frame_zero_shifted(0.0) == pytest.approx(loss_with_frame_zero_shifted(100.0))
    torch.manual_seed(0)
    assert batch_loss(T2V, pipe, None, batch, torch.float32).item() != pytest.approx(loss_with_frame_zero_shifted(0.0))


def test_an_image_file_conditions_what_generate_renders(ltx_folder, tmp_path):
    """`vidtune generate --image`: the file read as the pipeline's image, rendered through `render`."""
    from vidtune.evaluation.inference import read_image
    from vidtune.evaluation.pyfunc import render

    _image(size=64).save(tmp_path / "first.png")
    video = render(
        I2V.load_pipeline(str(ltx_folder)),
        "a red car",
        num_frames=FRAMES,
        height=64,
        width=64,
        steps=2,
        guidance_scale=1.0,
        seed=0,
        conditioning=I2V.sampling_arguments(read_image(tmp_path / "first.png")),
    )
    assert video.shape == (FRAMES, 64, 64, 3)
    (tmp_path / "notes.png").write_text("not an image")
    with pytest.raises(ValueError, match=r"image: .*notes.png is not an image file"):
        read_image(tmp_path / "notes.png")


def test_validation_samples_and_evaluation_are_refused_up_front_naming_the_setting():
    """Until validation and evaluation give an image-to-video run its conditioning images, asking for them fails
    before any work, naming the setting, instead of deep inside the first sample render."""
    i2v, t2v = get_family("ltx-video-i2v"), get_family("ltx-video")
    with pytest.raises(ValueError, match=r"^validation\.prompts: .*leave validation\.prompts empty"):
        i2v.check_samples_possible(["a red car"])
    with pytest.raises(ValueError, match=r"^run_evaluation: .*run_evaluation=false"):
        i2v.check_samples_possible([], run_evaluation=True)
    i2v.check_samples_possible([])  # training alone is fine
    t2v.check_samples_possible(["a red car"], run_evaluation=True)
