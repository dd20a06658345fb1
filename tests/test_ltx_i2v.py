"""LTX-Video image-to-video (`ltx-video-i2v`) beyond the shared family suite: it loads the text-to-video checkpoint
when chosen by name, trains from the cached clip latents (their first latent frame is the first frame's), and its
pipeline starts the video from the conditioning image."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.test_families import FRAMES, _image, _render, _video
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
    packed = _render(pipe, family, image, size=64, output_type="latent")
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
    batch = {"latents": I2V.encode_video(pipe, _video(size=64)), "text": {"embeds": text.embeds, "mask": text.mask}}
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


def test_samples_with_no_conditioning_image_and_bad_images_are_refused_up_front_naming_the_setting(tmp_path):
    """Samples of an image-to-video run start from validation.images, else the held-out clips' first frames; with
    neither, or with an image that is not one, the run fails before any work, naming the setting."""
    for prompts, evaluate in ((["a red car"], False), ([], True)):
        with pytest.raises(ValueError, match=r"^holdout_clips: .*first frames or validation\.images.*holdout_clips"):
            I2V.check_samples_possible(prompts, [], run_evaluation=evaluate, holdout_clips=0)
    I2V.check_samples_possible(["a red car"], [], run_evaluation=True, holdout_clips=1)
    I2V.check_samples_possible([], [])  # training alone needs no image
    _image().save(tmp_path / "first.png")
    I2V.check_samples_possible(["a red car"], [str(tmp_path / "first.png")], run_evaluation=True)
    with pytest.raises(ValueError, match=r"^validation\.images: .*missing\.png does not exist"):
        I2V.check_samples_possible(["a red car"], [str(tmp_path / "missing.png")], holdout_clips=2)
    (tmp_path / "notes.png").write_text("not an image")
    with pytest.raises(ValueError, match=r"^validation\.images: .*notes\.png is not an image file"):
        I2V.check_samples_possible(["a red car"], [str(tmp_path / "notes.png")], holdout_clips=2)
    with pytest.raises(ValueError, match=r"^validation\.images: LTX-Video \(ltx-video\) generates from text only"):
        T2V.check_samples_possible(["a red car"], [str(tmp_path / "first.png")])
    T2V.check_samples_possible(["a red car"], [], run_evaluation=True)


def test_first_frame_psnr_measures_the_first_frame_only():
    from vidtune.evaluation.metrics import PSNR_CAP, first_frame_psnr

    image = np.full((8, 8, 3), 100, dtype=np.uint8)
    video = np.stack([image, np.zeros_like(image)])  # only frame 0 counts
    assert first_frame_psnr(video, image) == PSNR_CAP
    off_by_ten = np.stack([image + 10, image])
    assert first_frame_psnr(off_by_ten, image) == pytest.approx(10 * np.log10(255**2 / 100))


def test_first_frame_clip_compares_the_first_frame_with_the_image_in_clip_space(tiny_clip):
    """The cosine of CLIP image embeddings (the tiny random CLIP evaluation tests use): the image itself as frame 0
    scores 1, another image less; later frames do not count."""
    from vidtune.evaluation.metrics import first_frame_clip
    from vidtune.tasks.evaluate_tasks import clip_embedder
    from vidtune.training.tiny_models import TINY_CLIP

    embed = clip_embedder(TINY_CLIP, str(tiny_clip), "cpu")
    image, other = np.asarray(_image(0, size=64)), np.asarray(_image(1, size=64))
    given = embed(image[None], ["a red car"])[0][0]

    def score(video: np.ndarray) -> float:
        return first_frame_clip(embed(video, ["a red car"])[0], given)

    assert score(np.stack([image, other])) == pytest.approx(1.0, abs=1e-5)
    assert score(np.stack([other, image])) < score(np.stack([image, other])) - 1e-3


def test_relative_validation_images_are_stored_absolute(tmp_path, monkeypatch):
    """A relative (or ~) validation.images path is resolved where it is given, so train_job.json names the file for
    evaluation run from any other folder."""
    from vidtune.training.job import TrainJob
    from vidtune.training.params import TrainParams
    from vidtune.training.sampling import conditioning_images

    (tmp_path / "images").mkdir()
    _image(0).save(tmp_path / "images" / "first.png")
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.chdir(tmp_path / "images")
    params = TrainParams(validation={"prompts": ["a", "b"], "images": ["first.png", "~/images/first.png"]})
    assert params.validation.images == [str(tmp_path.resolve() / "images" / "first.png")] * 2
    job = TrainJob(
        model="unused",
        family=I2V.name,
        out=str(tmp_path / "run"),
        shards=[],
        frame_buckets=[9],
        sample_size=(9, 32, 32),
        params=params,
    )
    job.write()
    monkeypatch.chdir(tmp_path / "run")  # evaluation from another folder reads the job and finds the image
    stored = TrainJob.read(tmp_path / "run").params.validation.images
    assert stored == params.validation.images
    pictures = conditioning_images(I2V, 2, stored, [], [])
    assert all(np.array_equal(np.asarray(picture), np.asarray(_image(0))) for picture in pictures)


def _heldout_first_frames(shards: list[str], clip_ids: list[str]) -> list[np.ndarray]:
    """Each clip's first frame, decoded here with PyAV from the curated shard's MP4 (not the code under test)."""
    import io
    import tarfile

    import av

    frames = {}
    for shard in shards:
        with tarfile.open(shard) as tar:
            for member in tar:
                clip_id, _, ext = member.name.rpartition(".")
                if ext == "mp4" and clip_id in clip_ids:
                    with av.open(io.BytesIO(tar.extractfile(member).read())) as container:
                        frames[clip_id] = next(container.decode(video=0)).to_ndarray(format="rgb24")
    return [frames[clip_id] for clip_id in clip_ids]


def _assert_images_written(folder, images) -> None:
    """`folder/image-NN.png` holds exactly the image sample NN was rendered from."""
    from PIL import Image

    for index, image in enumerate(images):
        with Image.open(folder / f"image-{index:02d}.png") as written:
            assert np.array_equal(np.asarray(written), np.asarray(image)), index


def test_validation_and_evaluation_start_from_the_held_out_clips_first_frames(
    curated, ltx_folder, tiny_clip, tmp_path, monkeypatch
):
    """Validation samples and evaluation of an image-to-video run: each prompt's video starts from a held-out clip's
    first frame (cycling: three prompts, two clips), base and adapted from the same ones, saved beside the samples,
    and the metrics gain first-frame fidelity (PSNR and CLIP) for both."""
    from diffusers import LTXImageToVideoPipeline

    from vidtune.evaluation.evaluate import evaluate_run
    from vidtune.tasks.evaluate_tasks import clip_embedder
    from vidtune.training.data import summarize_dataset
    from vidtune.training.job import TrainJob
    from vidtune.training.params import TrainParams
    from vidtune.training.sampling import SampleSettings
    from vidtune.training.tiny_models import TINY_CLIP
    from vidtune.training.trainer import train

    given = []
    render = LTXImageToVideoPipeline.__call__

    def recording(self, *args, **kwargs):  # the image each sample is rendered from, as the pipeline receives it
        given.append(kwargs.get("image"))
        return render(self, *args, **kwargs)

    monkeypatch.setattr(LTXImageToVideoPipeline, "__call__", recording)
    output, _, _ = curated
    dataset = summarize_dataset(output, [9], I2V.name)
    heldout = dataset.holdout(2).clip_ids[:2]  # whole sources may hold out more; two clips, three prompts
    prompts = ["a red car", "a blue sky", "a green tree"]
    validation = {"prompts": prompts, "every": 2, "inference_steps": 2}
    params = TrainParams(rank=4, learning_rate=1e-3, mixed_precision="no", max_steps=2, validation=validation)
    job = TrainJob(
        model=str(ltx_folder),
        family=I2V.name,
        out=str(tmp_path / "run"),
        data_source="shards",
        shards=dataset.shards,
        frame_buckets=[9],
        sample_size=(9, 64, 64),
        params=params,
        holdout_clip_ids=heldout,
        tracking_uri=f"sqlite:///{tmp_path}/mlflow.db",
    )
    job.write()  # as the finetune flow does: evaluation reads it
    train(job)
    assert (tmp_path / "run" / "samples" / "step-000002" / "sample-02.mp4").stat().st_size > 0
    first = _heldout_first_frames(dataset.shards, heldout)
    assert np.abs(first[0].astype(float) - first[1]).mean() > 5  # the two clips' first frames tell apart

    def assert_started_from_heldout_frames(images) -> None:
        assert len(images) == len(prompts) and all(image is not None for image in images)
        for index, image in enumerate(images):
            assert np.abs(np.asarray(image, dtype=float) - first[index % 2]).mean() < 2, index

    assert_started_from_heldout_frames(given)
    _assert_images_written(tmp_path / "run" / "samples" / "step-000002", given[-3:])  # the last step's samples
    given.clear()
    settings = SampleSettings(prompts, 9, 64, 64, inference_steps=2, guidance_scale=1.0, seed=42, fps=8)
    embed = clip_embedder(TINY_CLIP, str(tiny_clip), "cpu")
    metrics = evaluate_run(tmp_path / "run", settings, embed, draws=1)
    assert_started_from_heldout_frames(given[:3])
    assert_started_from_heldout_frames(given[3:])  # adapted: the same images as base
    _assert_images_written(tmp_path / "run" / "evaluation" / "samples", given[:3])
    for name in ("first_frame_psnr", "first_frame_clip"):
        assert np.isfinite(metrics[f"{name}_base"]) and np.isfinite(metrics[f"{name}_adapted"]), name
    report = (tmp_path / "run" / "evaluation" / "report.md").read_text()
    assert "| first_frame_psnr |" in report and "| first_frame_clip |" in report and "image-NN.png" in report
