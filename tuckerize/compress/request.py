"""What a decomposition is asked to do, validated once before any work.

:class:`DecomposeRequest` gathers the choices of a run (ranks or a budget, the
calibration, the research settings of ``method:``, the factors' storage, the output) and
:meth:`DecomposeRequest.validate` checks every rule that needs no model, in one place: a
bad flag fails before a hub download, a hash of the source or a calibration pass. Once the
source is open, :meth:`DecomposeRequest.choose_storage` settles the factor dtypes (the
source's unless ``factor_dtype`` says otherwise).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tuckerize.compress.method import Method
from tuckerize.errors import CalibrationError, RankError
from tuckerize.ranks import RankPlan, load_plan, uniform_plan


@dataclass
class DecomposeRequest:
    """Arguments of :func:`tuckerize.compress.decompose_checkpoint` (see its docstring)."""

    model: str
    out: Path | None = None
    # ranks: exactly one of ranks / config (with ranks) / ratio / params / bytes_budget
    ranks: str | tuple[int, int, int] | None = None
    config: Path | None = None
    ratio: float | None = None
    params: int | None = None
    # a byte budget: the routed experts in at most this fraction of their bf16 dense bytes,
    # every projection's ranks and storage chosen for it (tuckerize.compress.bytes_plan)
    bytes_budget: float | None = None
    normalise: str = "relative"
    save_config: Path | None = None
    # calibration: text, or saved statistics (calibration_stats.safetensors or its folder)
    calibration: str | None = None
    samples: int = 128
    seqlen: int = 512
    stats: Path | None = None
    calibration_batch: int = 8
    # the research settings (refit, sequential, expert_rank among them)
    method: Method = field(default_factory=Method)
    whiten_options: Any = None  # tuckerize.calibration.weights.WhitenOptions
    per_expert_stats: bool = False
    # storage of factors and cores (tuckerize.quant): e.g. "int8,core=int4"; None: the source's dtype
    factor_dtype: str | None = None
    # where
    revision: str | None = None
    device: str = "cpu"
    overwrite: bool = False
    # filled by validate()
    plan: RankPlan | None = None
    calibration_text: tuple[str, str] | None = field(default=None, repr=False)
    # filled by choose_storage() once the source is open
    factor_storage: dict[str, Any] | None = None
    factor_dtypes: dict[str, str] | None = None
    source_dtype: dict[str, Any] | None = None

    @property
    def calibrated(self) -> bool:
        """Statistics are used (collected from text or loaded)."""
        return self.calibration is not None or self.stats is not None

    @property
    def refit(self) -> bool:
        return self.method.refit

    @property
    def sequential(self) -> bool:
        return self.method.sequential

    @property
    def expert_rank(self) -> str:
        return self.method.expert_rank

    @property
    def whitening_on(self) -> bool:
        return self.calibrated and self.method.whiten

    @property
    def budget_tag(self) -> str | None:
        """``keep0.75`` / ``params500000`` for a budget, else None (names default paths)."""
        if self.ratio is not None:
            return f"keep{self.ratio:g}"
        if self.params is not None:
            return f"params{self.params}"
        if self.bytes_budget is not None:
            return f"bytes{self.bytes_budget:g}"
        return None

    def validate(self) -> "DecomposeRequest":
        """Check every rule that needs no model; load the rank plan and the calibration text
        (a missing file fails here, before any work). Returns self."""
        from tuckerize.allocate import check_budget, check_expert_rank

        plan = None
        if self.config is not None:
            plan = load_plan(self.config)
            if plan.empty:  # a config with only a method: section
                plan = None
        if self.bytes_budget is not None:
            self._check_bytes(plan)
        given = sum(x is not None for x in (self.ranks, plan, self.ratio, self.params, self.bytes_budget))
        if given != 1:
            raise RankError("give exactly one of --ranks r_E,r_H,r_I, --config FILE.yaml (with ranks), "
                            "--ratio F, --params N or --bytes B")
        if self.ranks is not None:
            plan = uniform_plan(self.ranks)
        self.plan = plan
        self.method.check()
        saved = saved_statistics(self.calibration)
        if saved is not None:  # --calibration names saved statistics, not text
            if self.stats is not None and Path(self.stats) != saved:
                raise CalibrationError(f"two sets of calibration statistics given ({saved} and {self.stats}); "
                                       "give one")
            self.stats, self.calibration = saved, None
        for name, does in (("sequential", "runs calibration tokens through the compressed layers"),
                           ("refit", "runs the calibration tokens through each layer")):
            if getattr(self.method, name) and self.calibration is None:
                given = (f"; {saved} is saved statistics, which hold no tokens (statistics with the same text, "
                         "--samples and --seqlen in --out are reused)") if saved is not None else ""
                raise CalibrationError(f"method.{name} needs --calibration TEXT (it {does}){given}")
        if self.sequential and not self.method.whiten:
            raise CalibrationError("method.sequential only changes the whitening statistics; drop method.whiten: "
                                   "false or method.sequential")
        if self.calibration is not None and (self.samples < 1 or self.seqlen < 2):
            raise CalibrationError(f"--samples {self.samples} --seqlen {self.seqlen}: need at least 1 sample of at "
                                   "least 2 tokens")
        check_budget(self.ratio, self.params)
        if self.bytes_budget is not None and not self.calibrated:
            raise CalibrationError("--bytes needs --calibration TEXT (or saved statistics): the allocator and the "
                                   "quantisers weigh every error by the calibration statistics")
        if self.factor_dtype is not None:
            from tuckerize.quant import parse_factor_dtype

            parse_factor_dtype(self.factor_dtype)  # a typo fails here; the source's dtype fills in later
        check_expert_rank(self.expert_rank)
        if self.whiten_options is None:
            self.whiten_options = self.method.whiten_options()
        else:  # given directly (library callers): the same ridge rule as method.damp
            Method(damp=self.whiten_options.damp).check("whiten_options")
        if self.calibration is not None and self.calibration_text is None:
            from tuckerize.text import read_text

            self.calibration_text = read_text(self.calibration, "calibration")
        return self

    def _check_bytes(self, plan) -> None:
        """``--bytes B``: a fraction in (0, 1], alone (it chooses ranks and storage), calibrated."""
        import math

        b = self.bytes_budget
        if not isinstance(b, (int, float)) or not (0.0 < b <= 1.0) or math.isnan(b):
            raise RankError(f"--bytes {b} is outside (0, 1]; it is the fraction of the bf16 dense experts' bytes to "
                            "store, e.g. 0.15")
        for option, value in (("--ranks", self.ranks), ("--ratio", self.ratio), ("--params", self.params),
                              ("--config with ranks", plan), ("--factor-dtype", self.factor_dtype)):
            if value is not None:
                raise RankError(f"--bytes chooses every projection's ranks and storage; drop {option}")
        for name in ("refit", "sequential"):
            if getattr(self.method, name):
                raise RankError(f"method.{name} is not available with --bytes (its forms are fitted to the dense "
                                "statistics); drop one")
        if self.method.expert_rank != "full":
            raise RankError("--bytes keeps r_E = number of experts; drop method.expert_rank: auto")

    def choose_storage(self, source_dtype: dict[str, Any]) -> None:
        """How factors are stored: ``factor_dtype`` as given, factors it leaves out (or all,
        when not given) in the source's dtype (``source_dtype``:
        :meth:`tuckerize.compress.source.SourceModel.factor_dtype`)."""
        from tuckerize.quant import parse_factor_dtype, storage

        self.source_dtype = dict(source_dtype)
        if self.bytes_budget is not None:  # chosen per projection (tuckerize.compress.bytes_plan)
            return
        self.factor_dtypes = parse_factor_dtype(self.factor_dtype or source_dtype["dtype"], source_dtype["dtype"])
        self.factor_storage = storage(self.factor_dtypes)

    def settings(self) -> dict[str, Any]:
        """The decomposition settings recorded in the fingerprint and the manifest."""
        iters = self.method.iters
        settings = {
            "algorithm": "st-hosvd" + ("+hooi" if iters else ""),
            "mode_order": "cheapest",
            "hooi_iters": iters,
            "hooi_tol": self.method.tol,
            "compute_dtype": "float32",
            "eigensolver": "float64 symmetric (Gram matrices)",
            "factor_dtype": self.factor_storage or "float32",
        }
        if self.whitening_on:
            settings["algorithm"] = ("whitened-" + settings["algorithm"]
                                     + ("+expert-als" if self.whiten_options.method == "expert" else ""))
        if self.bytes_budget is not None:
            settings.update(factor_dtype="per projection (--bytes)", bytes_budget=self.bytes_budget,
                            bytes_method=self.method.bytes.to_dict())
        return settings


def saved_statistics(calibration: str | Path | None) -> Path | None:
    """The statistics file ``--calibration`` names, or None when it names text: a
    ``.safetensors`` file, or a folder holding ``calibration_stats.safetensors`` (the output
    folder of a calibrated decompose)."""
    if calibration is None:
        return None
    from tuckerize.calibration.store import STATS_META, STATS_NAME

    path = Path(calibration).expanduser()
    if path.suffix == ".safetensors":
        return path
    if path.name == STATS_META:
        return path.with_name(STATS_NAME)
    if path.is_dir() and (path / STATS_NAME).is_file():
        return path / STATS_NAME
    return None


def model_stem(model: str) -> str:
    """A file-name-safe name of a model: a folder's name, or a hub id with ``/`` as ``--``."""
    return re.sub(r"[^\w.\-]+", "-", Path(model.rstrip("/")).name if Path(model).exists() else model.replace("/", "--"))


def default_out(model: str, plan: RankPlan | None, tag: str | None = None) -> Path:
    """``<model>-tucker-<ranks | plan file stem | budget tag>`` in the working directory."""
    stem = model_stem(model)
    if plan is None:
        return Path(f"{stem}-tucker-{tag}")
    if plan.default is not None and not plan.projections and not plan.layers and not plan.layer_projections:
        tag = "-".join(map(str, plan.default))
    else:
        tag = Path(plan.source).stem if plan.source != "--ranks" else "custom"
    return Path(f"{stem}-tucker-{tag}")
