"""The options of one training run; ``kdcache train`` builds a :class:`TrainConfig`."""

from __future__ import annotations

import math
import re
import shlex
import sys
from dataclasses import dataclass, field

from kdcache.errors import KdcacheError
from kdcache.features import parse_pairs
from kdcache.losses import (
    FEATURE_LOSSES,
    Sum,
    create_loss,
    feature_terms,
    is_feature_term,
    parse_loss,
)
from kdcache.options import (
    DEVICE_HELP,
    LABEL_MAP_HELP,
    MAX_PIXELS_HELP,
    PLAN_SEED_HELP,
    RENDERER_HELP,
    VIEWS_HELP,
    WEIGHTS_HELP,
    WORKERS_HELP,
    mean_help,
    num_classes_help,
    option,
)
from kdcache.precompute_config import PrecomputeConfig
from kdcache.train.modes import MODES, TeacherMode, get_mode
from kdcache.views import MIN_IMAGE_SIZE, get_spec

_DEVICE = re.compile(r"auto|cpu|mps|cuda(:[0-9]+)?")
# Aliases derived from the mode registry (kdcache.train.modes), kept for their importers.
TEACHER_MODES = tuple(MODES)
# The student's views when --views is not given (cached mode: the cache decides).
DEFAULT_VIEWS = {name: m.default_views for name, m in MODES.items() if m.default_views}


# What a run's config.json holds beside its options: what the run resolved. Given back with
# --config they are checked against what the new run resolves (fit's ``expect``), not taken.
RESOLVED_KEYS = (
    "image_size_resolved",
    "student_input",
    "teacher_input",
    "accuracy_basis",
    "view_spec",
    "resolved_plan_seed",
    "teacher_image_size_resolved",
    "train_samples",
    "data_fingerprint",
    "cache_epochs",
    "loss_resolved",
)
# The feature loss of --features when no feature term is written.
DEFAULT_FEATURE_LOSS = "fitnet(w=1.0)"
# The help sections of the train options.
RUN = "data and run"
MODELS = "models"
VIEWS = "views"
OPTIM = "optimisation (Beyer et al. 2022 names)"


@dataclass
class TrainConfig:
    """The options of ``kdcache train``; each field carries its command-line option."""

    data: str = option(help="training shards", group=RUN)
    val: str = option(help="held-out shards (center views)", group=RUN)
    student: str = option(help="model spec, e.g. kdcache:resnet_s", group=MODELS)
    out: str = option(help="run directory", group=RUN)
    epochs: int = option(help="student epochs", group=OPTIM)
    teacher_mode: str = option(
        "cached",
        help="where targets come from: cached (replay the --cache), online (run --teacher on "
        "the same views), fixed (the teacher's center-view predictions: a one-epoch --cache, "
        "made on first use), independent (--teacher on its own random view), none (hard "
        "labels)",
        choices=MODES,
        group=MODELS,
    )
    cache: str | None = option(
        None,
        help="cached mode: a cache made by `kdcache precompute`; fixed mode: the teacher's "
        "one-epoch center-view cache (made there on first use when --teacher is given)",
        group=MODELS,
    )
    teacher: str | None = option(
        None,
        help="teacher spec (online mode; in cached mode it is checked against the cache and "
        "used for val agreement)",
        group=MODELS,
    )
    teacher_weights: str | None = option(None, help=WEIGHTS_HELP, group=MODELS)
    student_weights: str | None = option(None, help="initial weights of the student", group=MODELS)
    views: str | None = option(
        None,
        help=VIEWS_HELP,
        metavar="SPEC",
        shown="cached: the cache's; fixed, independent: consistent; else function_matching",
        group=VIEWS,
    )
    plan_seed: int | None = option(
        None, help=PLAN_SEED_HELP, shown="the cache's, or 0", group=VIEWS
    )
    seed: int = option(0, help="student init and data order", group=OPTIM)
    image_size: int | str = option(
        224, help="student input px, or auto (the data's median short side)", group=VIEWS
    )
    teacher_image_size: int | str | None = option(
        None,
        help="teacher input px or auto",
        shown="the cache's, or --image-size",
        group=VIEWS,
    )
    batch_size: int = option(256, help="global batch, split over ranks", group=OPTIM)
    lr: float = option(1e-3, help="peak AdamW learning rate", group=OPTIM)
    weight_decay: float = option(
        1e-4, help="AdamW weight decay (PyTorch convention, multiplied by lr)", group=OPTIM
    )
    warmup: float = option(1.0, help="epochs of linear warm-up", group=OPTIM)
    clip_grad: float = option(1.0, help="gradient-norm clip, 0 off", group=OPTIM)
    temperature: float = option(1.0, help="distillation T", group=OPTIM)
    loss: str | None = option(
        None,
        help="the loss: name(k=v) terms joined by +, each with a weight w, e.g. "
        "'kl(t=2)+ce(w=0.1)' (KL plus 0.1 x hard-label cross-entropy) or "
        "'kl+myloss:Smooth(w=0.5)' (a class in ./myloss.py); built-ins kl, soft_ce, "
        "reverse_kl, dkd(alpha, beta, t), ce (hard labels); see docs/methods.md",
        metavar="SPEC",
        shown="kl(t=--temperature), ce() with --teacher-mode none",
        group=OPTIM,
    )
    features: str | None = option(
        None,
        help="feature distillation, online mode: layer pairs TEACHER_LAYER=STUDENT_LAYER,... "
        "(teacher on the left), by their module paths (layer3, features.6, or 3 inside the "
        "built-ins' nn.Sequential; `kdcache models --layers SPEC` lists them); the feature "
        "terms of --loss (or --feature-loss) apply to them",
        metavar="PAIRS",
        group=OPTIM,
    )
    feature_loss: str | None = option(
        None,
        help="feature terms added to --loss on the --features pairs: fitnet(w), at(w, p), "
        "rkd(w_dist, w_angle), pkt(w), mse(w), joined by +; the same as writing them in --loss",
        metavar="SPEC",
        shown="fitnet(w=1.0) with --features, without --loss or --curriculum",
        group=OPTIM,
    )
    akd_features: str | None = option(
        None,
        help="avatar KD, online mode: layer pairs TEACHER_LAYER=STUDENT_LAYER,... as for "
        "--features; each step, dropout avatars of the teacher's maps (--avatar-drop), "
        "standardised with the student's by BatchNorm(affine=False), compared by --akd-loss "
        "and added to --loss (the same as --features PAIRS --loss 'LOSS+akd(p=P, base=B)')",
        metavar="PAIRS",
        group=OPTIM,
    )
    avatar_drop: float = option(
        0.1, help="the avatars' elementwise dropout probability (--akd-features)", group=OPTIM
    )
    akd_loss: str = option(
        "cwd",
        help="the avatars' base loss: cwd (channel-wise distillation, tau 1) or mse",
        choices=("cwd", "mse"),
        group=OPTIM,
    )
    avatar_weight: float = option(
        0.0,
        help="cached mode, a cache made with --avatars N: add W x the avatar ensemble's KL to "
        "the loss, each view weighted by --avatar-uncertainty (the same as --loss "
        "'LOSS+avatar_kl(w=W)')",
        metavar="W",
        group=OPTIM,
    )
    avatar_uncertainty: str = option(
        "inverse",
        help="the avatar term's weight of a view with uncertainty u: inverse, 1 / (1 + u / "
        "mean u) over the batch; none, 1",
        choices=("inverse", "none"),
        group=OPTIM,
    )
    prune_teacher: bool = option(
        False,
        help="InDistill's width alignment: each --features teacher layer (a Conv2d, or the "
        "BatchNorm2d after one) wider than its student layer is replaced, for distillation "
        "only, by a copy keeping its highest-L1 filters, as many as the student layer has",
        group=OPTIM,
    )
    curriculum: str | None = option(
        None,
        help="InDistill's layer curriculum: distil the --features pairs one at a time, named "
        "by their teacher layer, for so many epochs each (rest: to the end), MSE on maps and "
        "PKT on embed, before the run's own --loss; e.g. " + "'layer1:3,layer2:4,layer3:5,"
        "embed:rest'",
        metavar="STAGES",
        group=OPTIM,
    )
    reuse: str = option(
        "cycle",
        help="cached mode, a student longer than its cache: cycle (student epoch e replays "
        "cache epoch e mod E) or sample (each sample, in each student epoch, replays one of "
        "the E cached epochs, drawn from the plan seed, the epoch and the sample, as ml-dr "
        "draws its reinforcements); both replay exactly what the teacher saw",
        choices=("cycle", "sample"),
        group=VIEWS,
    )
    loader: str = option(
        "torch",
        help="what runs the decoding and cropping: torch (DataLoader worker processes, "
        "--workers of them) or ffcv (FFCV's loader, --workers threads, replaying kdcache's "
        "views and order; a .beton with --renderer ffcv: the same pixels, without the "
        "processes)",
        choices=("torch", "ffcv"),
        group=VIEWS,
    )
    views_per_decode: int = option(
        1,
        help="train V epochs' views of each image from one decode: epochs go in passes of V, "
        "each image's V views (cached ones from one epoch block) fall together in the stream, "
        "and every view is still trained once per V epochs (FKD trains 4 per decode)",
        metavar="V",
        group=VIEWS,
    )
    cache_limit: int | None = option(
        None,
        help="cached mode: replay only the first N complete epochs of the --cache (a cache of "
        "N epochs: its epochs do not depend on how many there are)",
        flags=("--cache-epochs",),
        metavar="N",
        shown="all of them",
        group=VIEWS,
    )
    eval_every: int = option(
        1,
        help="evaluate on --val every N epochs, and after the last; best.pt is the best "
        "evaluated epoch's model",
        metavar="N",
        group=RUN,
    )
    retrieval: bool = option(
        False,
        help="also score retrieval at each evaluation: 11-point interpolated mAP "
        "(retrieval_map_cosine, retrieval_map_euclidean) of the val images as queries against "
        "the training images (the first --limit) as the database, embeddings the input of the "
        "student's last linear layer, as InDistill reports it",
        group=RUN,
    )
    window: int = 4  # units shuffled together inside an epoch
    workers: int = option(2, help=WORKERS_HELP, group=OPTIM)
    device: str = option("auto", help=DEVICE_HELP, group=OPTIM)
    num_classes: int | None = option(
        None,
        help=num_classes_help("the teacher's (the cache's); none mode: the labels'"),
        group=MODELS,
    )
    student_mean: tuple[float, float, float] | None = option(
        None, help=mean_help("student"), metavar="R,G,B", group=MODELS
    )
    student_std: tuple[float, float, float] | None = option(
        None, help="[as the mean]", metavar="R,G,B", group=MODELS
    )
    teacher_mean: tuple[float, float, float] | None = option(
        None, help=mean_help("teacher"), metavar="R,G,B", group=MODELS
    )
    teacher_std: tuple[float, float, float] | None = option(
        None, help="[as the mean]", metavar="R,G,B", group=MODELS
    )
    label_map: str | None = option(None, help=LABEL_MAP_HELP, metavar="FILE", group=MODELS)
    max_image_pixels: int | None = option(None, help=MAX_PIXELS_HELP, metavar="N", group=MODELS)
    renderer: str = option("pillow", help=RENDERER_HELP, choices=("pillow", "ffcv"), group=MODELS)
    resume: bool = option(
        False,
        help="continue OUT/checkpoint.pt; options that change the run (models, data, cache, "
        "views, seeds, sizes, batch size, optimiser) must be the run's own (OUT/config.json), "
        "--workers, --device, --checkpoint-every and --strict may change",
        group=RUN,
    )
    limit: int | None = option(
        None, help="train on the first N samples only (by global index)", group=RUN
    )
    strict: bool = option(
        False,
        help="unusable rows (bad in the cache, unreadable images) and shards cut short are "
        "errors, not skipped or warned about",
        group=RUN,
    )
    checkpoint_every: int = option(
        0,
        help="also checkpoint every N steps inside an epoch (0: at epoch ends)",
        metavar="N",
        shown="0",
        group=RUN,
    )
    extend: bool = option(
        False,
        help="with --resume: allow more --epochs than the run had; the warm-up and cosine "
        "schedule are recomputed over the new --epochs and continue from the current step "
        "(the lr jumps to that curve's value)",
        group=RUN,
    )
    command: str = field(default_factory=lambda: shlex.join(sys.argv))

    def teacher_pass(self, out: str, epochs: int, views: str) -> PrecomputeConfig:
        """The teacher pass that makes a cache for runs like this one: the fixed mode's
        center cache, ``kdcache ablate``'s caches. Data, teacher, its input convention and
        size, the bad-row rules and the machine settings are this run's."""
        return PrecomputeConfig(
            data=self.data,
            teacher=self.teacher or "",
            teacher_weights=self.teacher_weights,
            out=out,
            epochs=epochs,
            views=views,
            num_classes=self.num_classes,
            teacher_mean=self.teacher_mean,
            teacher_std=self.teacher_std,
            max_image_pixels=self.max_image_pixels,
            renderer=self.renderer,
            limit=self.limit,
            plan_seed=self.plan_seed or 0,
            teacher_image_size=self.teacher_image_size or self.image_size,
            workers=self.workers,
            device=self.device,
            strict=self.strict,
            command=self.command,
        )

    @property
    def mode(self) -> TeacherMode:
        """The :class:`~kdcache.train.modes.TeacherMode` that ``teacher_mode`` names."""
        return get_mode(self.teacher_mode)

    def create_loss(self) -> Sum:
        """The run's loss: ``--loss``, or the mode's default (``kl(t=TEMPERATURE)`` with a
        teacher, ``ce()`` on labels). With ``--loss``, a ``--temperature`` other than 1 is the
        ``t`` of each term that takes one and names none (``validate`` refuses a term naming
        its own ``t`` then: which would win is not obvious)."""
        spec = self.loss_spec
        if self.loss is None and spec == self.mode.default_loss(self.temperature):
            return create_loss(spec)
        defaults = {"t": float(self.temperature)} if self.temperature != 1 else {}
        return create_loss(spec, defaults)

    @property
    def loss_spec(self) -> str:
        """The whole loss as one spec: ``--loss`` (or the mode's default), then the terms of
        ``--feature-loss``, or ``fitnet`` when ``--features`` is given without ``--loss`` or
        ``--curriculum``."""
        spec = self.loss if self.loss is not None else self.mode.default_loss(self.temperature)
        if self.avatar_weight:
            spec = (
                f"{spec}+avatar_kl(uncertainty='{self.avatar_uncertainty}', "
                f"w={float(self.avatar_weight)!r})"
            )
        if self.akd_features:
            return f"{spec}+akd(p={float(self.avatar_drop)!r}, base='{self.akd_loss}')"
        if self.feature_loss:
            spec = f"{spec}+{self.feature_loss}"
        elif self.features and self.loss is None and not self.curriculum:
            spec = f"{spec}+{DEFAULT_FEATURE_LOSS}"
        return spec

    @property
    def feature_pairs(self) -> str | None:
        """The layer pairs the feature terms apply to: ``--features`` or ``--akd-features``."""
        return self.akd_features or self.features

    def validate(self) -> None:
        """Check the options against each other; report every problem at once."""
        problems = []
        mode = MODES.get(self.teacher_mode)
        if mode is None:
            problems.append(f"--teacher-mode must be one of {', '.join(TEACHER_MODES)}")
        else:
            problems += mode.problems(self.cache, self.teacher)
        problems += [
            f"--{name.replace('_', '-')} must be at least {low}, got {value}"
            for name, value, low in (
                ("epochs", self.epochs, 1),
                ("batch_size", self.batch_size, 1),
                ("checkpoint_every", self.checkpoint_every, 0),
                ("limit", self.limit, 1),
                ("workers", self.workers, 0),
                ("num_classes", self.num_classes, 2),
                ("window", self.window, 1),
                ("eval_every", self.eval_every, 1),
                ("views_per_decode", self.views_per_decode, 1),
                ("cache_epochs", self.cache_limit, 1),
                ("max_image_pixels", self.max_image_pixels, 1),
                ("seed", self.seed, 0),
                ("plan_seed", self.plan_seed, 0),
            )
            if value is not None and value < low
        ]
        for name, low, positive in (
            ("lr", 0.0, True),
            ("weight_decay", 0.0, False),
            ("warmup", 0.0, False),
            ("clip_grad", 0.0, False),
            ("temperature", 0.0, True),
        ):
            value = getattr(self, name)
            option = "--" + name.replace("_", "-")
            if not math.isfinite(value):
                problems.append(f"{option} must be a finite number, got {value}")
            elif value < low or (positive and value == low):
                problems.append(
                    f"{option} must be {'positive' if positive else 'at least 0'}, got {value}"
                )
        if self.loss is not None:
            problems += _loss_problems(self.loss, self.temperature)
        if not math.isfinite(self.avatar_weight) or self.avatar_weight < 0:
            problems.append(f"--avatar-weight must be at least 0, got {self.avatar_weight}")
        if self.feature_loss is not None:
            problems += _feature_problems(self.feature_loss, "--feature-loss")
        if mode is not None and not problems:
            problems += self._feature_pairing(mode)
        if self.reuse not in ("cycle", "sample"):
            problems.append(f"--reuse must be cycle or sample, got {self.reuse!r}")
        if self.views is not None:
            try:
                get_spec(self.views)
            except KdcacheError as e:
                problems.append(str(e))
        if not _DEVICE.fullmatch(str(self.device)):
            problems.append(f"--device must be auto, cpu, cuda, cuda:N or mps, got {self.device!r}")
        for name in ("image_size", "teacher_image_size"):
            value = getattr(self, name)
            if value not in (None, "auto") and int(value) < MIN_IMAGE_SIZE:
                option = "--" + name.replace("_", "-")
                problems.append(
                    f"{option} must be at least {MIN_IMAGE_SIZE} px or auto, got {value}"
                )
        if problems:
            raise KdcacheError("; ".join(problems))

    def _feature_pairing(self, mode: TeacherMode) -> list[str]:
        """--features and the feature terms of the loss, checked against each other and the
        mode (the teacher's features exist only where it runs live on the student's views)."""
        if self.akd_features and (self.features or self.feature_loss or self.curriculum):
            return [
                "--akd-features is --features PAIRS with an akd term: give --features and "
                "write akd(p=..., base=...) in --loss to combine it with other feature terms"
            ]
        if not 0 <= self.avatar_drop < 1:
            return [f"--avatar-drop must be in [0, 1), got {self.avatar_drop}"]
        terms = feature_terms(self.loss_spec)
        pairs_spec = self.feature_pairs
        if terms and not pairs_spec:
            names = ", ".join(dict.fromkeys(t.name for t in terms))
            return [f"the feature loss {names} needs --features TEACHER_LAYER=STUDENT_LAYER,..."]
        if (self.prune_teacher or self.curriculum) and not pairs_spec:
            return ["--prune-teacher and --curriculum need --features TEACHER_LAYER=STUDENT_LAYER"]
        if pairs_spec:
            try:
                pairs = parse_pairs(pairs_spec)
                if self.curriculum:
                    from kdcache.train.feature_distill import parse_curriculum

                    parse_curriculum(self.curriculum, [t for t, _ in pairs])
            except KdcacheError as e:
                return [str(e)]
            if not (mode.runs_teacher and mode.sees_student_views):
                return [
                    f"--features needs the teacher's features on the student's views, and "
                    f"--teacher-mode {mode.name} has none; use --teacher-mode online"
                ]
        return []


def _feature_problems(spec: str, what: str) -> list[str]:
    try:
        terms = parse_loss(spec, what)
    except KdcacheError as e:
        return [str(e)]
    other = [str(t) for t in terms if not is_feature_term(t)]
    if other:
        return [f"{what} takes feature losses only ({', '.join(FEATURE_LOSSES)}); "
                f"write {', '.join(other)} in --loss"]  # fmt: skip
    return []


def _loss_problems(spec: str, temperature: float) -> list[str]:
    """``--loss`` checked without importing a user's module: grammar, names, weights, and no
    ``t`` given twice (in a term and by ``--temperature``)."""
    try:
        terms = parse_loss(spec)
    except KdcacheError as e:
        return [str(e)]
    if not any(t.is_user for t in terms):  # built-ins check their arguments without torch
        try:
            create_loss(spec)
        except KdcacheError as e:
            return [str(e)]
    named = [str(t) for t in terms if "t" in t.kwargs]
    if temperature != 1 and named:
        return [
            f"--temperature {temperature} and --loss {spec!r} both set a temperature "
            f"({', '.join(named)}): drop --temperature, or the t= of the --loss terms"
        ]
    return []
