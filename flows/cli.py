"""`vidtune`: each command parses its arguments and runs the flow of the same name."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markdown import Markdown
from rich.markup import escape
from rich.table import Table

from vidtune.flows.config import ParamError, build_params, describe_params
from vidtune.training.defaults import FPS, GUIDANCE_SCALE, INFERENCE_STEPS

app = typer.Typer(
    name="vidtune",
    help="Raw videos in, a fine-tuned video-diffusion LoRA out. Each command runs the Prefect flow of the same name.",
    no_args_is_help=True,
    add_completion=False,
)
console = Console()
ConfigOpt = Annotated[Path | None, typer.Option("--config", help="YAML file of parameters (same names as --set).")]
SetOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--set",
        metavar="KEY=VALUE",
        help="Override one parameter, e.g. --set scenes.threshold=30 (repeatable; --list-params shows them all).",
    ),
]


def _list_params_option(model_path: str):
    """An eager --list-params flag that prints every parameter of the command's model and exits."""

    def callback(value: bool) -> None:
        if not value:
            return
        module, name = model_path.rsplit(".", 1)
        model = getattr(__import__(module, fromlist=[name]), name)
        table = Table("parameter", "default", "meaning", title=f"{name} (YAML --config keys and --set targets)")
        for key, default, description in describe_params(model):
            table.add_row(key, default, description)
        console.print(table)
        raise typer.Exit()

    return typer.Option("--list-params", is_eager=True, callback=callback, help="Show every parameter and exit.")


def _fail(message: str, code: int = 2) -> None:
    console.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)  # paths stay copyable
    raise typer.Exit(code)


@app.command()
def curate(
    input: Annotated[
        str,
        typer.Argument(
            metavar="INPUT", help="Folder of raw videos (recursive), one file, or an fsspec URL (s3://...)."
        ),
    ],
    output: Annotated[
        Path,
        typer.Argument(metavar="OUTPUT", help="Dataset folder to write: shards/*.tar, manifest.parquet, stats.json."),
    ],
    config: ConfigOpt = None,
    set_: SetOpt = None,
    strict: Annotated[bool, typer.Option(help="Exit 1 if any source or clip failed.")] = False,
    list_params: Annotated[bool, _list_params_option("vidtune.flows.curate.CurateParams")] = False,
) -> None:
    """Split raw videos into scene clips and write WebDataset shards plus a manifest.

    Every input appears in OUTPUT/manifest.parquet: kept clips, and a row with a reason for each source or
    clip that was filtered or failed. Rerunning on the same OUTPUT resumes: finished sources are skipped.
    """
    from vidtune.flows.curate import CurateParams
    from vidtune.flows.curate import curate as curate_flow
    from vidtune.tasks.discover import is_remote
    from vidtune.tasks.output import OutputMismatchError
    from vidtune.tasks.preflight import ModelSetupError

    try:
        params = build_params(
            CurateParams, base={"input": input, "output": str(output)}, config=config, overrides=set_ or []
        )
    except ParamError as exc:
        _fail(str(exc))
    if not is_remote(input) and not Path(input.removeprefix("file://")).expanduser().exists():
        _fail(f"input: {input!r} does not exist")  # before starting Prefect
    try:
        summary = curate_flow(params)
    except (FileNotFoundError, OutputMismatchError, ModelSetupError, ValueError) as exc:
        _fail(str(exc))  # input and settings problems (e.g. a malformed captions.csv): a message, not a traceback
    from vidtune.evaluation.report import print_curate_summary

    print_curate_summary(summary, console)
    if strict and (summary["sources"]["failed"] or summary["clips"]["failed"]):
        raise typer.Exit(1)


@app.command()
def finetune(
    data: Annotated[Path, typer.Option("--data", help="Curated dataset folder (the OUTPUT of vidtune curate).")],
    model: Annotated[str, typer.Option("--model", help="Base model: a local diffusers folder or a hub id.")],
    out: Annotated[Path, typer.Option("--out", help="Run folder: adapter/ (or model/), checkpoints/, samples/.")],
    raw: Annotated[
        str | None,
        typer.Option(
            "--raw", help="Raw videos to curate into DATA first (folder, file or fsspec URL; curate.* settings apply)."
        ),
    ] = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
    list_params: Annotated[bool, _list_params_option("vidtune.flows.finetune.FinetuneParams")] = False,
) -> None:
    """Fine-tune MODEL on curated clips: a LoRA by default (--set training_type=full for all weights).

    With --raw, the curate flow first turns raw videos into DATA. Encodes the clips once into a latent cache
    (DATA/latent_cache), trains with accelerate, evaluates against the base model and registers the result
    in MLflow; writes OUT/adapter/pytorch_lora_weights.safetensors (load it with pipe.load_lora_weights).
    Rerun with --set resume=latest to continue after a crash; --set num_processes=N trains on N GPUs.
    """
    from vidtune.evaluation.registry import RegistryError
    from vidtune.flows.finetune import FinetuneParams
    from vidtune.flows.finetune import finetune as finetune_flow
    from vidtune.training.data import DatasetError
    from vidtune.training.trainer import TrainingDiverged

    base = {
        "data": str(data),
        "model": model,
        "out": str(out),
        **({"curate": {"input": raw, "output": str(data)}} if raw else {}),
    }
    try:
        params = build_params(FinetuneParams, base=base, config=config, overrides=set_ or [])
    except ParamError as exc:
        _fail(str(exc))
    try:
        summary = finetune_flow(params)
    except (
        DatasetError,
        TrainingDiverged,
        RegistryError,
        ValueError,
        FileNotFoundError,
    ) as exc:  # curate's are ValueErrors
        _fail(str(exc))
    if summary.get("prepared"):
        console.print(
            f"prepared {summary['out']}/train_job.json ({sum(summary['buckets'].values())} clips in buckets {summary['buckets']}); "
            f"train with: accelerate launch [your config] -m vidtune.training.launch {summary['out']}/train_job.json",
            highlight=False,
            soft_wrap=True,
        )
        return
    from vidtune.evaluation.report import print_finetune_summary

    print_finetune_summary(summary, console)


@app.command()
def plan(
    model: Annotated[
        str, typer.Option("--model", help="Base model: a local diffusers folder or a hub id (published ones: offline).")
    ],
    config: ConfigOpt = None,
    set_: SetOpt = None,
    vram: Annotated[
        str | None,
        typer.Option("--vram", help="GPU memory to fit: 24GB (10^9 bytes), 24GiB or 24 (GB); default: this GPU's."),
    ] = None,
    bucket: Annotated[
        list[str] | None,
        typer.Option(
            "--bucket",
            metavar="FxHxW",
            help="A clip size to plan for, e.g. 81x480x832 (repeatable); default: the config's frame buckets at its "
            "clip sizes, or its data folder's buckets when it holds a curated dataset.",
        ),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the plan as JSON.")] = False,
) -> None:
    """Estimate the GPU memory one training step of MODEL takes at a finetune config's settings and clip sizes.

    Line by line: the weights by dtype (fp8 and block swap included), the LoRA or trained weights, gradients and
    optimizer state, the activations (calibrated per family, with or without checkpointing) and the latent cache's
    size; then whether it fits --vram and the fastest settings that do (fp8, blocks_to_swap, buckets to leave out).
    Without --config: the family's defaults (a LoRA, the default buckets at 832x480 and its transpose and square).
    """
    from vidtune.training.memory_plan import device_memory, parse_vram, plan_memory
    from vidtune.training.model_footprint import Bucket

    try:
        params, family, buckets, data_source = _plan_inputs(model, config, set_ or [])
        vram_bytes = parse_vram(vram) if vram else device_memory()
        if vram_bytes is None:
            _fail("--vram: there is no GPU here to measure; give the memory to plan for, e.g. --vram 24GB")
        if bucket:
            buckets = dict.fromkeys(Bucket.parse(b) for b in bucket)
        result = plan_memory(model, params, buckets, vram_bytes, family, data_source)
    except ValueError as exc:  # ParamError too
        _fail(str(exc))
    typer.echo(result.model_dump_json(indent=2) if as_json else result.table())


def _plan_inputs(model: str, config: Path | None, overrides: list[str]):
    """What `vidtune plan` reads of a finetune config and --set: the trainer's settings, the family, the data
    source and the buckets (the data folder's, with their clip counts, when it holds a curated dataset; else the
    frame buckets at the clip sizes). Other finetune settings are accepted and not used."""
    from pydantic import ValidationError

    from vidtune.flows.config import format_validation_error, load_values
    from vidtune.flows.finetune import FinetuneParams
    from vidtune.tasks.clips import ClipParams
    from vidtune.training.cache import STILL_FRAMES, PrecomputeParams, frame_buckets
    from vidtune.training.data import summarize_dataset
    from vidtune.training.families import get_family
    from vidtune.training.layout import DatasetLayout
    from vidtune.training.model_footprint import Bucket, model_family
    from vidtune.training.params import TrainParams

    values = load_values(base={"model": model}, config=config, overrides=overrides)
    unknown = sorted(set(values) - set(FinetuneParams.model_fields))
    if unknown:
        raise ParamError("invalid parameters:\n" + "\n".join(f"  {key}: unknown parameter" for key in unknown))
    sections = {  # each named as the user types its keys (finetune's)
        None: lambda: TrainParams.model_validate(  # for the machine planned for: no check of installed backends
            {k: v for k, v in values.items() if k in TrainParams.model_fields}, context={"remote": True}
        ),
        "precompute": lambda: PrecomputeParams.model_validate(values.get("precompute") or {}),
        "curate.clips": lambda: ClipParams.model_validate((values.get("curate") or {}).get("clips") or {}),
    }
    validated = {}
    for section, validate in sections.items():
        try:
            validated[section] = validate()
        except ValidationError as exc:
            raise ParamError(format_validation_error(exc, section=section)) from None
    params, precompute, clips = validated[None], validated["precompute"], validated["curate.clips"]
    family = get_family(values["family"]) if values.get("family") else model_family(model)
    lengths = frame_buckets(family, precompute)
    data = values.get("data") or (values.get("curate") or {}).get("output")
    if data and DatasetLayout(Path(data).expanduser()).shard_files():
        counts = summarize_dataset(Path(data).expanduser(), lengths, family.name).buckets
        buckets = {Bucket.parse(key): clips for key, clips in counts.items()}
    else:
        sizes = clips.sizes()
        buckets = {Bucket(f, h, w): None for f in lengths if f != STILL_FRAMES for w, h in sizes}
    return params, family, buckets, values.get("data_source", "cache")


@app.command()
def evaluate(
    run: Annotated[Path, typer.Argument(metavar="RUN", help="A finished `vidtune finetune` --out folder.")],
    config: ConfigOpt = None,
    set_: SetOpt = None,
    list_params: Annotated[bool, _list_params_option("vidtune.flows.evaluate.EvaluateParams")] = False,
) -> None:
    """Compare the base model and RUN's fine-tune on fixed prompts and noise.

    Writes RUN/evaluation/: metrics.json, report.md (base, adapted, delta), contact_sheet.png and the samples.
    """
    from vidtune.flows.evaluate import EvaluateParams
    from vidtune.flows.evaluate import evaluate as evaluate_flow

    try:
        params = build_params(EvaluateParams, base={}, config=config, overrides=set_ or [])
        evaluate_flow(str(run), params)
    except (ParamError, FileNotFoundError, ValueError) as exc:
        _fail(str(exc))
    from vidtune.training.layout import RunLayout

    console.print(Markdown(RunLayout(run).report.read_text()))


@app.command()
def register(
    run: Annotated[Path, typer.Argument(metavar="RUN", help="A finished `vidtune finetune` --out folder.")],
    config: ConfigOpt = None,
    set_: SetOpt = None,
    list_params: Annotated[bool, _list_params_option("vidtune.flows.evaluate.RegisterParams")] = False,
) -> None:
    """Register RUN's adapter (or full model) in MLflow as a new version aliased `challenger`.

    The promotion gate moves `champion` to it when it beats the base on held-out loss, keeps CLIP alignment
    within tolerance and beats the current champion of the same base model. Running it twice adds no version.
    """
    from vidtune.evaluation.registry import RegistryError
    from vidtune.flows.evaluate import RegisterParams
    from vidtune.flows.evaluate import register as register_flow

    try:
        params = build_params(RegisterParams, base={}, config=config, overrides=set_ or [])
        result = register_flow(str(run), params)
    except (ParamError, FileNotFoundError, RegistryError, ValueError) as exc:
        _fail(str(exc))
    console.print(
        escape(f"{result['model_uri']} [{', '.join(result['aliases'])}]: {result['gate']}"),
        highlight=False,
        soft_wrap=True,
    )


@app.command("import-lora")
def import_lora(
    file: Annotated[
        Path,
        typer.Argument(
            metavar="FILE", help="The LoRA .safetensors file (of a two-expert model: the high-noise expert's)."
        ),
    ],
    model: Annotated[str, typer.Option("--model", help="Its base model: a local diffusers folder or a hub id.")],
    file_2: Annotated[
        Path | None,
        typer.Option(
            "--file-2",
            help="The low-noise expert's LoRA (transformer_2) of a two-expert model (Wan 2.2 A14B's low_noise file).",
        ),
    ] = None,
    name: Annotated[str | None, typer.Option("--name", help="Registered model name (default: vidtune-style).")] = None,
    data: Annotated[
        Path | None, typer.Option("--data", help="A curated dataset for the held-out loss (else: sample metrics only).")
    ] = None,
    out: Annotated[
        Path | None, typer.Option("--out", help="Run folder (default: under $VIDTUNE_HOME/imports).")
    ] = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
    list_params: Annotated[bool, _list_params_option("vidtune.flows.import_lora.ImportLoraParams")] = False,
) -> None:
    """Bring a LoRA trained elsewhere (musubi-tuner, diffusion-pipe, ai-toolkit, finetrainers, ComfyUI) into the
    registry: evaluated against the base and registered through the same gate as a `vidtune finetune` run.

    Reads diffusers keys (transformer.<module>.lora_A.weight), original-model keys (diffusion_model.<module>.lora_A
    or lora_down, optional .alpha) and kohya keys (lora_unet_<module>.lora_down.weight + .alpha); converts them
    with diffusers' converters where they fit the model, else by the family's ComfyUI module names.

    A two-expert model (Wan 2.2 A14B) takes the high-noise expert's file as FILE and the low-noise expert's as
    --file-2; FILE alone adapts the high-noise expert only.
    """
    from vidtune.evaluation.registry import RegistryError
    from vidtune.flows.import_lora import ImportLoraParams
    from vidtune.flows.import_lora import import_lora as import_flow

    base = {"file": str(file), "model": model, "registry": {"name": name} if name else {}}
    base |= {"data": str(data)} if data else {}
    base |= {"out": str(out)} if out else {}
    base |= {"file_2": str(file_2)} if file_2 else {}
    try:
        params = build_params(ImportLoraParams, base=base, config=config, overrides=set_ or [])
        result = import_flow(params)
    except (ParamError, FileNotFoundError, RegistryError, ValueError) as exc:
        _fail(str(exc))
    from vidtune.training.layout import RunLayout

    console.print(Markdown(RunLayout(Path(result["out"])).report.read_text()))
    console.print(
        escape(
            f"{result['source_format']}-format LoRA (rank {result['rank']}, {result['modules']} modules, "
            f"{result['converter']}' converter) -> {result['out']}/adapter"
        ),
        highlight=False,
        soft_wrap=True,
    )
    registration = result["registration"]
    if registration:
        console.print(
            escape(f"{registration['model_uri']} [{', '.join(registration['aliases'])}]: {registration['gate']}"),
            highlight=False,
            soft_wrap=True,
        )


@app.command()
def generate(
    model: Annotated[
        str,
        typer.Option(
            "--model",
            help="A model URI MLflow resolves: models:/NAME@ALIAS, models:/NAME/VERSION, models:/NAME/latest, "
            "models:/m-<id> or runs:/<run id>/adapter.",
        ),
    ],
    prompt: Annotated[str, typer.Option("--prompt", help="What to render.")],
    out: Annotated[Path, typer.Option("--out", help="Output file, .mp4 or .gif.")],
    lora_scale: Annotated[float, typer.Option(help="LoRA strength (0 = base model).")] = 1.0,
    steps: Annotated[int, typer.Option(help="Denoising steps.")] = INFERENCE_STEPS,
    frames: Annotated[int | None, typer.Option(help="Frames; default: the training clips'.")] = None,
    height: Annotated[int | None, typer.Option(help="Height; default: the training clips'.")] = None,
    width: Annotated[int | None, typer.Option(help="Width; default: the training clips'.")] = None,
    seed: Annotated[int, typer.Option(help="Noise seed.")] = 0,
    guidance_scale: Annotated[float, typer.Option(help="Classifier-free guidance (1 = off).")] = GUIDANCE_SCALE,
    fps: Annotated[int, typer.Option(help="Frame rate of the written file.")] = FPS,
    cpu_offload: Annotated[bool, typer.Option(help="Keep idle components on the CPU (GPU memory saver).")] = False,
    vae_tiling: Annotated[bool, typer.Option(help="Decode in tiles (large frames on small GPUs).")] = False,
    base_model: Annotated[
        str | None,
        typer.Option(help="The base model's folder or hub id here (default: the recorded one, else its hub id)."),
    ] = None,
    image: Annotated[
        Path | None,
        typer.Option(
            "--image",
            help="The video's first frame, for a model of an image-to-video family (ltx-video-i2v): required there, "
            "refused for text-to-video models.",
        ),
    ] = None,
) -> None:
    """Render a prompt with a registered model (models:/NAME@ALIAS) to an MP4 or GIF.

    Builds the base pipeline from the version's base-model reference (the recorded folder, else its hub id, else
    --base-model) and loads its LoRA (downloaded once into $VIDTUNE_HOME/models), or loads the registered fully
    fine-tuned pipeline.
    """
    from vidtune.evaluation.inference import ModelNotFound
    from vidtune.evaluation.inference import generate as generate_video

    try:
        path = generate_video(
            model,
            prompt,
            out,
            lora_scale=lora_scale,
            steps=steps,
            num_frames=frames,
            height=height,
            width=width,
            seed=seed,
            guidance_scale=guidance_scale,
            fps=fps,
            cpu_offload=cpu_offload,
            vae_tiling=vae_tiling,
            base_model=base_model,
            image=image,
        )
    except (ModelNotFound, ValueError) as exc:
        _fail(str(exc))
    console.print(f"wrote {path}", highlight=False, soft_wrap=True)


@app.command("synth-videos")
def synth_videos(
    out: Annotated[Path, typer.Argument(help="Folder to write the videos to.")],
    seconds: Annotated[float, typer.Option(help="Length of each video.")] = 6.0,
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
) -> None:
    """Write a set of synthetic raw videos with known scene cuts (24/25/30 fps, VFR, odd size, rotated, fade,
    dissolve, GIF) to try the pipeline without your own footage."""
    from vidtune.tasks.synthetic_videos import make_raw_video_set

    for video in make_raw_video_set(out, seed=seed, seconds=seconds):
        console.print(
            f"{video.path}  {video.num_frames} frames @ {video.fps:g} fps, cuts at {video.cuts}", highlight=False
        )


@app.command("tiny-model")
def tiny_model(
    family: Annotated[
        str,
        typer.Argument(
            metavar="FAMILY",
            help="A model family (wan, ltx-video, ...) or a published variant (wan-14b, wan2.2-ti2v-5b, wan2.2-t2v-a14b); an unknown name lists them all.",
        ),
    ],
    out: Annotated[Path, typer.Argument(metavar="OUT", help="Folder to write the diffusers-format model to.")],
) -> None:
    """Build a tiny random model of FAMILY's published checkpoint and save it with save_pretrained.

    Every component comes from the checkpoint's own config files (shipped in the package) with only size fields
    shrunk: scheduler, VAE normalisation, RoPE and tokenizer lengths are as published. The folder loads with
    DiffusionPipeline.from_pretrained(OUT), like a real checkpoint: for tests, demos and trying the pipeline
    without downloading weights.
    """
    from vidtune.training.tiny_models import build_tiny

    try:
        folder = build_tiny(family, out)
    except ValueError as exc:
        _fail(str(exc))
    console.print(
        f"wrote a tiny {family} pipeline to {folder} (load it with DiffusionPipeline.from_pretrained)", highlight=False
    )


def _require_prefect_server() -> str:
    """The Prefect API (configured, or vidtune's local server), checked reachable: serving or triggering
    deployments needs a real server."""
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL

    url = PREFECT_API_URL.value()
    start = "start it, or unset PREFECT_API_URL to use vidtune's local server (`vidtune server start`)"
    if not url:
        _fail(f"no Prefect server configured: {start}")
    with get_client(sync_client=True) as client:
        problem = client.api_healthcheck()
    if problem is not None:
        _fail(f"the Prefect server at {url} does not answer ({problem}); {start}")
    return url


@app.command()
def serve(
    file: Annotated[
        Path | None, typer.Option("--file", help="Deployments file; default: ./prefect.yaml, else the project's.")
    ] = None,
    only: Annotated[
        list[str] | None, typer.Option("--only", metavar="FLOW/NAME", help="Serve just these deployments (repeatable).")
    ] = None,
    limit: Annotated[
        int | None,
        typer.Option(
            help="Flow runs at a time (default: no limit; the `gpu` concurrency limit still queues GPU work)."
        ),
    ] = None,
) -> None:
    """Serve the deployments of prefect.yaml from this process (no work pool needed): a laptop or one GPU box.

    Needs a Prefect server (PREFECT_API_URL). Start runs from its UI (Deployments -> finetune/style -> Run),
    with `prefect deployment run finetune/style`, or with `vidtune run finetune/style --set key=value`.
    Each run executes in a subprocess of this one; stop with Ctrl-C.
    """
    from vidtune.flows.deployments import find_project_file, serve_project

    url = _require_prefect_server()
    try:
        path = find_project_file(file)
        console.print(
            f"serving the deployments of {path} against {url.removesuffix('/api')}", highlight=False, soft_wrap=True
        )
        serve_project(path, only=only, limit=limit)
    except (ParamError, FileNotFoundError) as exc:
        _fail(str(exc))


@app.command()
def run(
    deployment: Annotated[
        str,
        typer.Argument(metavar="FLOW/NAME", help="A deployment, e.g. finetune/style (see `prefect deployment ls`)."),
    ],
    set_: SetOpt = None,
    watch: Annotated[bool, typer.Option(help="Wait for the run to finish; exit 1 unless it completed.")] = False,
) -> None:
    """Start a run of a deployment with its preset parameters plus --set changes (merged key by key).

    Keys are the flow's parameter fields: `vidtune run finetune/style --set curate.input=/data/raw --set
    max_steps=500`. Bad keys or values are refused before the run is created. (`prefect deployment run`
    replaces the whole `params` object instead.)
    """
    from prefect.exceptions import ObjectNotFound, PrefectHTTPStatusError

    from vidtune.flows.deployments import run_with_overrides

    url = _require_prefect_server()
    try:
        flow_run = run_with_overrides(deployment, set_ or [], watch)
    except ParamError as exc:
        _fail(str(exc))
    except PrefectHTTPStatusError as exc:  # e.g. the server's own parameter-schema check
        _fail(str(exc.response.json().get("detail", exc)))
    except ObjectNotFound:
        _fail(
            f"no deployment {deployment!r} on {url}; `prefect deployment ls` lists them (vidtune serve or prefect deploy --all creates them)"
        )
    console.print(
        f"flow run {flow_run.name} ({flow_run.id}): {flow_run.state.name if flow_run.state else 'created'}",
        highlight=False,
    )
    console.print(f"{url.removesuffix('/api')}/runs/flow-run/{flow_run.id}", highlight=False, soft_wrap=True)
    if watch and not (flow_run.state and flow_run.state.is_completed()):
        raise typer.Exit(1)


@app.command()
def demo(
    workdir: Annotated[Path, typer.Option(help="Where the demo writes its videos, dataset and runs.")] = Path(
        "demo-run"
    ),
) -> None:
    """Run the whole pipeline on generated videos and a tiny Wan: curate, fine-tune a LoRA, evaluate, register, generate.

    The flow runs go to the Prefect server at PREFECT_API_URL, else to vidtune's local server (started on first
    use; the command prints its UI address at the end).
    """
    from vidtune.flows.demo import run_demo

    run_demo(workdir, console)


server_app = typer.Typer(
    help="The local Prefect server (and warm workers) vidtune starts on first use when PREFECT_API_URL is unset.",
    no_args_is_help=True,
)
app.add_typer(server_app, name="server")


@server_app.command("start")
def server_start() -> None:
    """Start the local Prefect server on 127.0.0.1 (port 4200, else a free one; VIDTUNE_SERVER_PORT picks one)
    unless it is running. Its database is $VIDTUNE_HOME/prefect/prefect.db; it runs until `vidtune server stop`."""
    from vidtune.flows.server import start_server

    try:
        state, started = start_server(say=lambda m: console.print(m, highlight=False))
    except RuntimeError as exc:
        _fail(str(exc), code=1)
    console.print(
        f"{'started' if started else 'already running'}: Prefect UI {state.ui_url} (pid {state.pid})\n"
        f"point other tools at it with: export PREFECT_API_URL={state.api_url}",
        highlight=False,
        soft_wrap=True,
    )


@server_app.command("stop")
def server_stop() -> None:
    """Stop the local Prefect server and the warm workers (runs stay in the database for the next start)."""
    from vidtune.flows.server import stop_server
    from vidtune.flows.worker import stop_workers

    workers = stop_workers()
    state = stop_server()
    console.print(
        f"stopped {len(workers)} warm worker(s); "
        + (f"stopped the Prefect server (pid {state.pid})" if state else "no local Prefect server was running"),
        highlight=False,
    )


@server_app.command("status")
def server_status(as_json: Annotated[bool, typer.Option("--json", help="Print the state as JSON.")] = False) -> None:
    """Is the local Prefect server running (address, pid, database), and which warm workers (runs served, models)."""
    import json
    from dataclasses import asdict

    from vidtune.flows.server import configured_api_url, healthy, server_state
    from vidtune.flows.worker import worker_states

    state, workers = server_state(), worker_states()
    if as_json:
        server = {**asdict(state), "api_url": state.api_url, "healthy": healthy(state.api_url)} if state else None
        console.print_json(
            json.dumps(
                {"server": server, "workers": [asdict(w) for w in workers], "configured_api_url": configured_api_url()}
            )
        )
        return
    if url := configured_api_url():
        console.print(
            f"PREFECT_API_URL is set ({url}): vidtune uses that server, not its own", highlight=False, soft_wrap=True
        )
    if state:
        answer = "answering" if healthy(state.api_url) else "NOT answering"
        console.print(
            f"Prefect server: {state.ui_url} (pid {state.pid}, {answer}), database {state.database}, log {state.log}",
            highlight=False,
            soft_wrap=True,
        )
    else:
        console.print("Prefect server: not running (the next command that runs a flow starts it)", highlight=False)
    for w in workers:
        console.print(
            f"warm worker: pid {w.pid}, {w.served} run(s) served, models {w.models or 'none yet'}, log {w.log}",
            highlight=False,
            soft_wrap=True,
        )
    if not workers:
        console.print("warm workers: none", highlight=False)


# Commands whose flows report to a Prefect server (serve and run need one; the rest would otherwise start Prefect's
# temporary server, 7-22 s each time).
PREFECT_COMMANDS = {"curate", "finetune", "evaluate", "register", "demo", "serve", "run"}


def main(argv: list[str] | None = None) -> None:  # the `vidtune` console script
    """Point flows at a Prefect server, hand heavy commands to the warm worker, else run the app here.

    Nothing heavy is imported on this path: the local server and the worker start side by side, so a first run
    waits for the slower of the two, not for both."""
    import sys

    from vidtune.flows.server import announce, use_local_server, wait_for_server
    from vidtune.flows.worker import ensure_worker, hand_off, wants_worker

    if not sys.stderr.isatty():  # a log file or pipe: no carriage-return download bars (the worker inherits it)
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    argv = sys.argv[1:] if argv is None else argv
    say = lambda message: console.print(escape(message), style="dim", highlight=False, soft_wrap=True)  # noqa: E731
    flags = {"--help", "-h", "--list-params"}
    server = None
    if (
        argv
        and argv[0] in PREFECT_COMMANDS
        and not flags & set(argv)
        and os.environ.get("VIDTUNE_LOCAL_SERVER", "1") != "0"
    ):
        server = use_local_server(say=say)
    worker = ensure_worker("vidtune.flows.cli:app") if wants_worker(argv) else None
    if server:
        try:
            wait_for_server(server[0])
        except RuntimeError as exc:
            _fail(str(exc), code=1)
        if server[1]:
            announce(server[0], say=say)
    if worker and (code := hand_off(argv, *worker, say=say)) is not None:
        raise SystemExit(code)
    app(args=argv, prog_name="vidtune")


if __name__ == "__main__":  # python -m vidtune.flows.cli
    main()
