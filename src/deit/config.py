"""Configuration: frozen dataclasses whose leaf names are deit3-jax's flags in snake_case.

The sections group related flags; on the command line the section prefix is dropped, so
`--learning-rate 1e-3` works as it did in deit3-jax. A recipe is a flat `{flag: value}` dict
(see `recipes/`), mapped onto the sections by `from_flat`.
"""

import contextlib
import dataclasses
import io
import json
import re
import sys
from collections.abc import Callable
from typing import Annotated, Any, Literal, TypeVar

import tyro

def _check(checks: list[tuple[bool, str]]) -> None:
    for ok, msg in checks:
        if not ok:
            raise ValueError(msg)


def _in(name: str, value: float | int, lo: float | int, hi: float | int, lo_open: bool = False, hi_open: bool = False) -> tuple[bool, str]:
    ok = (lo < value if lo_open else lo <= value) and (value < hi if hi_open else value <= hi)
    interval = f"{'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"
    return ok, f"{name}={value}: must be in {interval}"


def _min(name: str, value: float | int, lo: float | int) -> tuple[bool, str]:
    return value >= lo, f"{name}={value}: must be >= {lo}"


def check_divisible(name: str, value: int, by: int, what: str) -> int:
    """value // by; a one-line ValueError naming both when `by` does not divide `value`."""
    if value < 1 or value % by:
        raise ValueError(f"{name}={value} is not divisible by {what}")
    return value // by


def check_batches(cfg: "Config", devices: int) -> None:
    """Batches split evenly over the devices (and, for training, over grad_accum micro-batches)."""
    accum = cfg.optim.grad_accum
    check_divisible("train_batch_size", cfg.data.train_batch_size, devices, f"the device count {devices}")
    check_divisible("valid_batch_size", cfg.data.valid_batch_size, devices, f"the device count {devices}")
    check_divisible("train_batch_size", cfg.data.train_batch_size, devices * accum,
                    f"devices x grad_accum = {devices} x {accum}")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Architecture. Field names are deit3-jax's flags; extra fields default to its behaviour."""

    layers: int = 12
    dim: int = 768
    heads: int = 12
    labels: int = 1000
    """Classes of the head; 0 builds no head and the model returns the normalised tokens."""
    layerscale: bool = False
    layerscale_init: float = 1e-4
    """Initial LayerScale value (deit3-jax 1e-4; timm's deit3_* use 1e-6)."""
    patch_size: int = 16
    image_size: int = 224
    posemb: Literal["learnable", "sincos2d"] = "learnable"
    pooling: Literal["cls", "gap"] = "cls"
    dropout: float = 0.0
    droppath: float = 0.0
    grad_ckpt: bool = False
    scan_unroll: int = 1
    """Blocks per iteration of the layer scan: 1 keeps compile time flat in depth; -1 (or
    `layers`) unrolls it fully, deit3-jax's graph, at a compile time growing with depth: the
    TPU compiler then needs no loop buffers (the stacked gradients, a bf16 copy of the stacked
    weights; DeiT-B/16 on a v4: 2.44 GiB per device against the scan's 3.06); XLA:CPU runs
    the scan faster (ViT-S/16 train 4.10 img/s against 3.29 unrolled). Same math; float
    rounding may differ in the last bits."""
    gelu: Literal["exact", "tanh"] = "exact"
    """'exact' (erf) as timm; deit3-jax's flax models use 'tanh'."""
    distilled: bool = False
    """DeiT v1 distillation token and second head (token order: cls, dist, patches)."""

    def __post_init__(self):
        checks = [
            (self.layers >= 1, f"layers={self.layers}: must be >= 1"),
            (self.scan_unroll == -1 or 1 <= self.scan_unroll <= self.layers,
             f"scan_unroll={self.scan_unroll}: allowed -1 (all blocks) or 1..layers={self.layers}"),
            (self.dim >= 1 and self.heads >= 1 and self.dim % self.heads == 0,
             f"dim={self.dim} is not divisible by heads={self.heads}"),
            (self.labels >= 0, f"labels={self.labels}: must be >= 0"),
            (self.patch_size >= 1 and self.image_size % self.patch_size == 0,
             f"image_size={self.image_size} is not divisible by patch_size={self.patch_size}"),
            (self.posemb in ("learnable", "sincos2d"), f"posemb={self.posemb!r}: allowed 'learnable', 'sincos2d'"),
            (self.pooling in ("cls", "gap"), f"pooling={self.pooling!r}: allowed 'cls', 'gap'"),
            (self.gelu in ("exact", "tanh"), f"gelu={self.gelu!r}: allowed 'exact', 'tanh'"),
            (0.0 <= self.dropout < 1.0, f"dropout={self.dropout}: must be in [0, 1)"),
            (0.0 <= self.droppath < 1.0, f"droppath={self.droppath}: must be in [0, 1)"),
            (not (self.distilled and self.pooling != "cls"), "distilled=True needs pooling='cls'"),
            (not (self.posemb == "sincos2d" and self.dim % 4), f"posemb='sincos2d' needs dim divisible by 4, got dim={self.dim}"),
        ]
        _check(checks)

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_prefix_tokens(self) -> int:
        return (self.pooling == "cls") + self.distilled

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown model config keys {unknown}; allowed: {sorted(names)}")
        return cls(**d)


@dataclasses.dataclass(frozen=True)
class DataConfig:
    train_dataset_shards: str = "digits:train"
    """webdataset shard spec: brace-expanded paths, `pipe:CMD`, gs:// or https:// URLs, or
    `digits:train` / `digits:valid` for the embedded digits dataset (prepared on first use)."""
    valid_dataset_shards: str | None = "digits:valid"
    """Validation shards; None (`null` in a recipe, as deit3-jax's in21k pre-training) validates
    nothing: no val metrics, `last` saved at each eval interval, no `best`."""
    train_batch_size: int = 64
    """Global batch size (all devices and hosts together)."""
    valid_batch_size: int = 256
    train_loader_workers: int = 0
    """Host decode workers; 0 decodes in the main process."""
    valid_loader_workers: int = 0
    shuffle_seed: int = 1
    shuffle_buffer: int = 5000
    label_mapping: str | None = None
    """JSON file {"src": [...], "dst": [...]} mapping pretrained head rows to new labels."""

    def __post_init__(self):
        _check([_min("train_batch_size", self.train_batch_size, 1), _min("valid_batch_size", self.valid_batch_size, 1),
                _min("train_loader_workers", self.train_loader_workers, 0),
                _min("valid_loader_workers", self.valid_loader_workers, 0),
                _min("shuffle_seed", self.shuffle_seed, 0), _min("shuffle_buffer", self.shuffle_buffer, 1)])


@dataclasses.dataclass(frozen=True)
class AugmentConfig:
    random_crop: Literal["none", "rrc", "src"] = "rrc"
    """'rrc' RandomResizedCrop, 'src' DeiT-III Simple Random Crop, 'none' resize only."""
    color_jitter: float = 0.0
    auto_augment: str | None = None
    """timm policy string, e.g. 'rand-m9-mstd0.5-inc1', or '3a' (DeiT-III 3-Augment)."""
    random_erasing: float = 0.0
    random_erasing_mode: Literal["torchvision", "pixel"] = "torchvision"
    """'torchvision': deit3-jax's `RandomErasing(p, value="random")` on the uint8 image after color
    jitter (the N(0, 1) noise stored as uint8: mostly 0, 1 and 255, so a dark box with white
    specks); 'pixel': timm's mode='pixel' on the normalised image (per-pixel N(0, 1); DeiT paper)."""
    geometric_fill: Literal["deit3-jax", "timm"] = "deit3-jax"
    """Fill colour of RandAugment's geometric ops: deit3-jax passes int(255 x ImageNet mean) =
    (123, 116, 103) to timm; timm's create_transform rounds, (124, 116, 104)."""
    augment_repeats: int = 1
    test_crop_ratio: float = 0.875
    hflip: float = 0.5
    """Probability of a horizontal flip (timm's default 0.5)."""
    mixup: float = 0.0
    cutmix: float = 0.0
    mixup_seed: int = 1
    affine_degrees: float = 0.0
    """torchvision RandomAffine per image (bilinear, black fill), before the flip: rotation
    uniform in +-degrees, shift in +-affine_translate x size (whole pixels), scale in
    1 +- affine_scale, x-shear in +-affine_shear degrees; all 0 (the default): off."""
    affine_translate: float = 0.0
    affine_scale: float = 0.0
    affine_shear: float = 0.0
    elastic_alpha: float = 0.0
    """torchvision ElasticTransform(elastic_alpha, elastic_sigma) per image after the affine
    (bilinear, black fill): a smooth random displacement field; 0 (the default): off."""
    elastic_sigma: float = 5.0

    def __post_init__(self):
        _check([
            (self.random_crop in ("none", "rrc", "src"), f"random_crop={self.random_crop!r}: allowed 'none', 'rrc', 'src'"),
            (self.random_erasing_mode in ("torchvision", "pixel"),
             f"random_erasing_mode={self.random_erasing_mode!r}: allowed 'torchvision', 'pixel'"),
            (self.geometric_fill in ("deit3-jax", "timm"),
             f"geometric_fill={self.geometric_fill!r}: allowed 'deit3-jax', 'timm'"),
            _min("color_jitter", self.color_jitter, 0.0), _in("random_erasing", self.random_erasing, 0.0, 1.0),
            _min("augment_repeats", self.augment_repeats, 1),
            _in("test_crop_ratio", self.test_crop_ratio, 0.0, 1.0, lo_open=True), _in("hflip", self.hflip, 0.0, 1.0),
            _min("mixup", self.mixup, 0.0), _min("cutmix", self.cutmix, 0.0),
            _in("affine_degrees", self.affine_degrees, 0.0, 180.0), _in("affine_translate", self.affine_translate, 0.0, 1.0),
            _in("affine_scale", self.affine_scale, 0.0, 1.0, hi_open=True),
            _in("affine_shear", self.affine_shear, 0.0, 90.0, hi_open=True),
            _min("elastic_alpha", self.elastic_alpha, 0.0), _min("elastic_sigma", self.elastic_sigma, 0.0)])


@dataclasses.dataclass(frozen=True)
class LossConfig:
    criterion: Literal["ce", "bce"] = "ce"
    """'ce' softmax cross-entropy; 'bce' deit3-jax's sigmoid BCE against targets > 0 after mixing."""
    label_smoothing: float = 0.0
    """timm's smoothing of the one-hot targets, for 'ce' only (deit3-jax applies none with 'bce')."""

    def __post_init__(self):
        _check([(self.criterion in ("ce", "bce"), f"criterion={self.criterion!r}: allowed 'ce', 'bce'"),
                _in("label_smoothing", self.label_smoothing, 0.0, 1.0, hi_open=True)])

    @property
    def target_smoothing(self) -> float:
        """The smoothing the targets get: label_smoothing under 'ce', none under 'bce'."""
        return self.label_smoothing if self.criterion == "ce" else 0.0


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    optimizer: Literal["adamw", "lamb"] = "adamw"
    learning_rate: float = 1e-3
    weight_decay: float = 0.05
    adam_b1: float = 0.9
    adam_b2: float = 0.999
    adam_eps: float = 1e-8
    lr_decay: float = 1.0
    clip_grad: float = 0.0
    grad_accum: int = 1
    warmup_steps: int = 0
    training_steps: int = 1000
    scale_lr: bool = False
    """timm's rule: peak lr = learning_rate x train_batch_size / 512 (off: deit3-jax's recipes give the peak)."""
    model_ema: bool = False
    """Keep an exponential moving average of the weights; evaluated (val_ema/*) and checkpointed."""
    model_ema_decay: float = 0.99996
    compute_dtype: Literal["float32", "bfloat16"] = "float32"
    """Forward/backward precision; parameters and optimiser state stay float32."""

    def __post_init__(self):
        _check([
            (self.optimizer in ("adamw", "lamb"), f"optimizer={self.optimizer!r}: allowed 'adamw', 'lamb'"),
            (self.compute_dtype in ("float32", "bfloat16"),
             f"compute_dtype={self.compute_dtype!r}: allowed 'float32', 'bfloat16'"),
            _min("learning_rate", self.learning_rate, 0.0), _min("weight_decay", self.weight_decay, 0.0),
            _in("adam_b1", self.adam_b1, 0.0, 1.0, hi_open=True), _in("adam_b2", self.adam_b2, 0.0, 1.0, hi_open=True),
            _min("adam_eps", self.adam_eps, 0.0), _in("lr_decay", self.lr_decay, 0.0, 1.0, lo_open=True),
            _min("clip_grad", self.clip_grad, 0.0), _min("grad_accum", self.grad_accum, 1),
            _min("warmup_steps", self.warmup_steps, 0), _min("training_steps", self.training_steps, 1),
            _in("model_ema_decay", self.model_ema_decay, 0.0, 1.0)])


@dataclasses.dataclass(frozen=True)
class DistillConfig:
    """DeiT distillation (needs `distilled=True` on the student)."""

    distillation_type: Literal["none", "soft", "hard"] = "none"
    distillation_alpha: float = 0.5
    distillation_tau: float = 1.0
    teacher_ckpt: str | None = None
    """Teacher weights, anything deit.load_model reads."""

    def __post_init__(self):
        _check([(self.distillation_type in ("none", "soft", "hard"),
                 f"distillation_type={self.distillation_type!r}: allowed 'none', 'soft', 'hard'"),
                _in("distillation_alpha", self.distillation_alpha, 0.0, 1.0),
                (self.distillation_tau > 0, f"distillation_tau={self.distillation_tau}: must be > 0")])


Flat = tyro.conf.OmitArgPrefixes


@dataclasses.dataclass(frozen=True)
class Config:
    model: Annotated[ModelConfig, Flat] = ModelConfig()
    data: Annotated[DataConfig, Flat] = DataConfig()
    augment: Annotated[AugmentConfig, Flat] = AugmentConfig()
    loss: Annotated[LossConfig, Flat] = LossConfig()
    optim: Annotated[OptimConfig, Flat] = OptimConfig()
    distill: Annotated[DistillConfig, Flat] = DistillConfig()
    fsdp: int = 1
    """Size of the mesh's `fsdp` axis (parameters and optimiser state sharded over it); the rest of
    the devices form `data`. -1: all devices (what the L/16 and H/14 recipes use, see recipes/_additions.json)."""
    init_seed: int = 1
    dropout_seed: int = 1
    log_interval: int = 50
    eval_interval: int = 500
    """Steps between evaluations (and `best`/`last` checkpoints)."""
    checkpoint_interval: int = 0
    """Steps between `last` checkpoints; 0 saves `last` at each evaluation only."""
    keep_interval: int = 0
    """Also keep a permanent `step-N` checkpoint every N steps (0: none)."""
    async_checkpoint: bool = True
    """Write checkpoint files in a background thread while training continues."""
    max_bad_steps: int = 10
    """Consecutive steps with a non-finite loss or gradient norm (each skipped) before the run stops."""
    coordinator_address: str | None = None
    """jax.distributed coordinator `host:port` (multi-host outside Cloud TPU / SLURM, which are automatic)."""
    num_processes: int | None = None
    """jax.distributed process count (with --coordinator-address)."""
    process_id: int | None = None
    """This process's index in [0, num_processes) (with --coordinator-address)."""
    host_timeout: int = 600
    """Seconds a process waits for the others (connecting to the coordinator, checkpoint and
    loader-state gathers, barriers) before it stops with one line naming the processes it waited for."""
    memory_report: int = 0
    """With --dry-run: compile the train step on this many fake devices and add XLA's per-device memory."""
    memory_report_tpu: str | None = None
    """With --dry-run: compile the train step with the TPU compiler for this topology (e.g.
    'v4:4x4x2' = v4-64) and add its per-device memory against the chip's HBM (needs `.[tpu]`)."""
    pretrained_ckpt: str | None = None
    output_dir: str = "outputs/run"
    aim_repo: str | None = None
    """Aim repository folder; default `<output-dir>/..` so runs of one folder are compared."""
    progress: bool = True
    """Show progress bars."""
    eval_only: bool = False
    """Evaluate `pretrained_ckpt` (or the run's last checkpoint), print JSON, and exit."""
    dry_run: bool = False
    """Print the resolved config, parameter count and forward FLOPs as JSON, then exit."""

    def __post_init__(self):
        _check([(self.fsdp == -1 or self.fsdp >= 1, f"fsdp={self.fsdp}: allowed -1 (all devices) or a device count >= 1"),
                _min("log_interval", self.log_interval, 1),
                _min("eval_interval", self.eval_interval, 1), _min("checkpoint_interval", self.checkpoint_interval, 0),
                _min("keep_interval", self.keep_interval, 0), _min("max_bad_steps", self.max_bad_steps, 1),
                _min("memory_report", self.memory_report, 0), _min("host_timeout", self.host_timeout, 1),
                (self.memory_report_tpu is None or re.fullmatch(r"v[0-9a-z]+:[0-9]+(x[0-9]+)*", self.memory_report_tpu),
                 f"memory_report_tpu={self.memory_report_tpu!r}: allowed a TPU topology such as 'v4:4x4x2' (v4-64), "
                 f"'v5e:4x4', 'v5p:2x2x2', 'v6e:4x4'"),
                (self.num_processes is None or self.num_processes >= 1,
                 f"num_processes={self.num_processes}: must be >= 1"),
                (self.process_id is None or self.num_processes is None or 0 <= self.process_id < self.num_processes,
                 f"process_id={self.process_id}: must be in [0, num_processes={self.num_processes})")])

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self, **kw: Any) -> str:
        return json.dumps(self.to_dict(), **kw)


SECTIONS = {"model": ModelConfig, "data": DataConfig, "augment": AugmentConfig, "loss": LossConfig, "optim": OptimConfig,
            "distill": DistillConfig}


def from_flat(flat: dict[str, Any], base: Config = Config()) -> Config:
    """Build a Config from deit3-jax style `{flag: value}` pairs (flag names in snake_case)."""
    owner = {f.name: sec for sec, cls in SECTIONS.items() for f in dataclasses.fields(cls)}
    top = {f.name for f in dataclasses.fields(Config)} - set(SECTIONS)
    updates: dict[str, dict[str, Any]] = {sec: {} for sec in SECTIONS}
    top_updates: dict[str, Any] = {}
    for k, v in flat.items():
        k = k.replace("-", "_")
        if k in owner:
            updates[owner[k]][k] = v
        elif k in top:
            top_updates[k] = v
        else:
            raise ValueError(f"unknown config key {k!r}; allowed: {sorted(set(owner) | top)}")
    sections = {sec: dataclasses.replace(getattr(base, sec), **u) for sec, u in updates.items()}
    return dataclasses.replace(base, **sections, **top_updates)


def from_dict(d: dict[str, Any]) -> Config:
    """Inverse of `Config.to_dict` (the resolved config written beside a run)."""
    flat: dict[str, Any] = {}
    for k, v in d.items():
        if k in SECTIONS:
            flat.update(v)
        else:
            flat[k] = v
    return from_flat(flat)


T = TypeVar("T")


def one_line(box: str) -> str:
    """tyro's error box -> its message on one line (the text between the first two rules)."""
    lines = [ln.strip(" │╭╮╰╯") for ln in box.splitlines()]
    rules = [i for i, ln in enumerate(lines) if ln and set(ln) <= set("-─")]
    body = lines[1:rules[0]] if rules else lines[1:]  # below the title, above the first rule
    if not "".join(body).strip() and len(rules) > 1:  # plain layout: title, rule, message, rule
        body = lines[rules[0] + 1:rules[1]]
    msg = re.sub(r"\s+", " ", " ".join(body)).strip()
    return re.sub(r"^Error parsing (__tyro\S*|\w*Config): ", "", msg) or "invalid arguments (see --help)"


def cli_or_exit(parse: Callable[[], T]) -> T:
    """`parse()` (a tyro.cli call); any bad input exits 2 with one line on stderr: tyro's error
    box condensed, or the message of a config check's ValueError."""
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            return parse()
    except ValueError as e:  # config validation (e.g. image_size not divisible by patch_size)
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except SystemExit as e:
        if e.code:  # tyro's multi-line box, condensed
            print(f"error: {one_line(err.getvalue())}", file=sys.stderr)
            sys.exit(2)
        sys.stderr.write(err.getvalue())  # --help goes to stdout; anything else is passed on
        raise
