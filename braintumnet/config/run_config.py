"""The run config (``[tool.flwr.app.config]``, ``flwr run -c``, ``python -m simulation -c``) read in one place.

Every key a run config may hold is typed here, and unknown keys are refused with the list of the known ones:

- the **profile's** keys (:data:`RUN_CONFIG_KEYS`), typed into a :class:`~braintumnet.config.profiles.Profile` by
  :func:`resolve`. A profile-dependent key left at ``0`` means "the profile's value"; any other value overrides the
  profile. The privacy and robustness keys (``dp.*``, ``robust.*``, ``strategy.*``) are the same in every profile and
  are taken literally, so a ``0`` there means zero (e.g. ``robust.norm-factor = 0`` turns the norm check off);
- the **app's** keys, the centre's and the simulated sites' settings beside the profile, typed into an
  :class:`AppConfig` by :func:`app_config`;
- ``profile``, the profile's name.

:func:`defaults` is the whole run config as typed here; ``tests/test_config.py`` keeps ``pyproject.toml``'s
``[tool.flwr.app.config]`` equal to it, so nothing reads ``pyproject.toml`` at run time. :func:`parse_bool` is the one
reading of a switch and :func:`parse_overrides` the one reading of ``key=value`` overrides.
"""

from __future__ import annotations

import difflib
import re
import tomllib
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any, Iterable, Mapping

from braintumnet.config.profiles import PROFILES, ConfigError, Profile, get_profile
from braintumnet.labels import SITES

DEFAULT_PROFILE = "quick"

# Run-config key -> (Profile section, field). Values of 0 or "" mean "the profile's".
RUN_CONFIG_KEYS: dict[str, tuple[str, str]] = {
    "data.img-size": ("data", "img_size"),
    "data.slices-per-case": ("data", "slices_per_case"),
    "task": ("data", "task"),
    "model.feature-size": ("model", "feature_size"),
    "model.gate-region": ("model", "gate_region"),
    "model.mode": ("model", "mode"),
    "model.gate-gradient": ("model", "gate_gradient"),
    "model.shared-features": ("model", "shared_features"),
    "model.shared-gradient": ("model", "shared_gradient"),
    "model.gate-floor": ("model", "gate_floor"),
    "model.postprocess": ("model", "postprocess"),
    "train.local-epochs": ("federation", "local_epochs"),
    "train.batch-size": ("train", "batch_size"),
    "train.site-batch-size": ("train", "site_batch_size"),
    "train.learning-rate": ("train", "learning_rate"),
    "train.seed": ("train", "seed"),
    "train.fedprox-mu": ("train", "fedprox_mu"),
    "train.logit-adjustment": ("train", "logit_adjustment"),
    "train.seg-ce-weight": ("train", "seg_ce_weight"),
    "train.warmup-epochs": ("train", "warmup_epochs"),
    "train.keep-optimizer-state": ("train", "keep_optimizer_state"),
    "cv.folds": ("train", "cv_folds"),
    "cv.fold": ("train", "cv_fold"),
    "num-server-rounds": ("federation", "num_rounds"),
    "fraction-train": ("federation", "fraction_train"),
    "fraction-evaluate": ("federation", "fraction_evaluate"),
    "min-train-nodes": ("federation", "min_train_nodes"),
    "min-evaluate-nodes": ("federation", "min_evaluate_nodes"),
    "min-available-nodes": ("federation", "min_available_nodes"),
    "wait-for-nodes-s": ("federation", "wait_for_nodes_s"),
    "round-timeout-s": ("federation", "round_timeout_s"),
    "dp.enabled": ("privacy", "enabled"),
    "dp.noise-multiplier": ("privacy", "noise_multiplier"),
    "dp.target-epsilon": ("privacy", "target_epsilon"),
    "dp.max-grad-norm": ("privacy", "max_grad_norm"),
    "dp.delta": ("privacy", "delta"),
    "dp.max-epsilon": ("privacy", "max_epsilon"),
    "strategy.aggregation": ("robust", "aggregation"),
    "strategy.trim-fraction": ("robust", "trim_fraction"),
    "robust.norm-factor": ("robust", "norm_factor"),
    "robust.max-weight-share": ("robust", "max_weight_share"),
    "strategy.server-optimizer": ("server", "optimizer"),
    "strategy.server-learning-rate": ("server", "learning_rate"),
    "strategy.server-momentum": ("server", "momentum"),
    "strategy.server-beta1": ("server", "beta_1"),
    "strategy.server-beta2": ("server", "beta_2"),
    "strategy.server-tau": ("server", "tau"),
}
# Sections every profile shares; their run-config values are literal (0 is a value, not "the profile's").
LITERAL_SECTIONS = {"privacy", "robust", "server"}
# Keys whose 0 is a real setting in every profile (no gradient, no floor), so they are literal too.
LITERAL_KEYS = {"model.shared-gradient", "model.gate-floor", "train.seg-ce-weight", "train.warmup-epochs",
                "train.logit-adjustment"}


@dataclass(frozen=True)
class AppConfig:
    """The run-config keys beside the profile: the centre's (its run folder, resumption, external cohort, tracking,
    message schedule) and the simulated sites' (their names, cache, device and phantom cohort). Field ``x_y`` is
    run-config key ``x-y``; docs/federation.md describes them.

    Args:
        checkpoint_dir: run folders and the embedded MLflow store; relative paths resolve against the SuperLink's
            working directory; "" = ``runs`` (:attr:`checkpoint_root` is the folder).
        resume_from: "" (fresh start), "latest", a run folder or a checkpoint file.
        external_data: "" or the centre's external cohort: a site folder or a prepared cache folder.
        mlflow_experiment: MLflow experiment name; "" turns MLflow off.
        audit_messages: describe every message the centre sends and receives in ``audit.jsonl`` in the run folder.
        evaluate_in_train: each train message asks the sites to score the global model they receive (the previous
            round's) before training, and only the last round has an evaluate message: one model download per site
            per round instead of two. Round r's federated metrics then arrive with round r+1's train replies.
        sites: the sites expected (for the waiting log) and, in simulation, partition i's name (comma-separated in
            the run config).
        cache_dir: the prepared-cache root; "" = ``$BRAINTUMNET_CACHE`` or ``.cache/braintumnet``.
        device: a simulated site's device: ``auto``, ``cpu``, ``cuda`` or ``cuda:N`` (a deployed site's comes from
            its node config).
        phantom_dir: the synthetic cohort a simulation trains on (generated on first use); "" =
            ``<cache root>/phantom-s<scale>-seed<seed>``.
        phantom_scale: its size (1 = the paper's cohort).
        phantom_seed: its random seed.
    """

    checkpoint_dir: str = "runs"
    resume_from: str = ""
    external_data: str = ""
    mlflow_experiment: str = "braintumnet-fl"
    audit_messages: bool = False
    evaluate_in_train: bool = True
    sites: tuple[str, ...] = SITES
    cache_dir: str = ""
    device: str = "auto"
    phantom_dir: str = ""
    phantom_scale: float = 0.05
    phantom_seed: int = 0

    @property
    def checkpoint_root(self) -> Path:
        """``checkpoint_dir`` as an absolute folder (``~`` expanded)."""
        return Path(self.checkpoint_dir or "runs").expanduser().absolute()


def _app_key(name: str) -> str:
    return name.replace("_", "-")


# Run-config key -> AppConfig field.
APP_CONFIG_KEYS: dict[str, str] = {_app_key(f.name): f.name for f in fields(AppConfig)}
# Every run-config key that is not typed into a Profile: the profile's name and the app's keys.
APP_KEYS = frozenset({"profile", *APP_CONFIG_KEYS})


def known_keys() -> frozenset[str]:
    """Every key a run config may hold."""
    return frozenset(RUN_CONFIG_KEYS) | APP_KEYS


def check_keys(run_config: Mapping[str, Any]) -> None:
    """Refuse keys that do not exist, before any work starts: a misspelt key would otherwise be silently ignored.

    Raises:
        ConfigError: naming every unknown key, where one is close the key that was probably meant, and the list of
            the known keys.
    """
    known = sorted(known_keys())
    unknown = sorted(k for k in run_config if k not in known)
    if not unknown:
        return
    hints = []
    for key in unknown:
        close = difflib.get_close_matches(key, known, n=1)
        hints.append(f"{key!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
    raise ConfigError(f"unknown run-config key(s): {', '.join(hints)}; the known keys are {', '.join(known)} "
                      "(docs/study.md describes them)")


def resolve(run_config: Mapping[str, Any] | None = None, profile: str | None = None) -> Profile:
    """Type a run config's profile keys: start from its profile and apply every key that is not left at 0 / "".

    Raises:
        ConfigError: naming a key that does not exist (``check_keys``) or a value of the wrong type.
        ValueError: naming an unknown profile or a value the dataclasses reject.
    """
    run_config = dict(run_config or {})
    check_keys(run_config)
    base = get_profile(profile or str(run_config.get("profile", DEFAULT_PROFILE)))
    sections: dict[str, dict[str, Any]] = {f.name: {} for f in fields(Profile)}
    for key, value in run_config.items():
        if key not in RUN_CONFIG_KEYS:
            continue  # an APP_KEYS key: read by app_config
        section, name = RUN_CONFIG_KEYS[key]
        literal = section in LITERAL_SECTIONS or key in LITERAL_KEYS
        if not literal and value in (0, 0.0, "") and not isinstance(value, bool):
            continue
        sections[section][name] = _typed(getattr(getattr(base, section), name), key, value)
    return Profile(**{s: replace(getattr(base, s), **v) for s, v in sections.items()})


def app_config(run_config: Mapping[str, Any] | None = None) -> AppConfig:
    """Type a run config's app keys (the others are ignored); a missing key takes :class:`AppConfig`'s default.

    Raises:
        ConfigError: naming a value of the wrong type (e.g. ``audit-messages = "maybe"``).
    """
    run_config = run_config or {}
    default = AppConfig()
    return AppConfig(**{name: _typed(getattr(default, name), key, run_config[key])
                        for key, name in APP_CONFIG_KEYS.items() if key in run_config})


def defaults() -> dict[str, Any]:
    """The whole run config with its defaults, as ``[tool.flwr.app.config]`` holds it: ``profile``; each profile
    key at the value every profile shares, or at ``0`` ("the profile's") where the profiles differ; each app key
    at :class:`AppConfig`'s default (``sites`` comma-separated)."""
    out: dict[str, Any] = {"profile": DEFAULT_PROFILE}
    for key, (section, name) in RUN_CONFIG_KEYS.items():
        values = [getattr(getattr(p, section), name) for p in PROFILES.values()]
        out[key] = values[0] if len(set(values)) == 1 else type(values[0])()
    default = AppConfig()
    for key, name in APP_CONFIG_KEYS.items():
        value = getattr(default, name)
        out[key] = ",".join(value) if isinstance(value, tuple) else value
    return out


def parse_bool(value: Any, key: str = "value") -> bool:
    """A switch: a bool, ``true`` / ``false`` (any case) or ``1`` / ``0``. Nothing else, since ``bool("false")`` is
    True and a loose reading would turn a switch on by mistake.

    Raises:
        ConfigError: naming ``key`` and the value.
    """
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("true", "1"):
        return True
    if text in ("false", "0"):
        return False
    raise ConfigError(f"{key}={value!r}: expected true or false")


# A key, "=", and a value: quoted (spaces allowed inside) or up to the next space, as flwr's -c reads them.
_PAIR = re.compile(r"""(\S+?)=('[^']*'|"[^"]*"|\S+)""")


def parse_overrides(items: Iterable[str]) -> dict[str, Any]:
    """Run-config overrides as ``flwr run -c`` takes them: ``key=value`` pairs, several to an item when separated by
    spaces, each value read as TOML (``3``, ``0.5``, ``true``, ``"text"``), a bare word that is not TOML as text
    (``model.mode=two-stage``). Later items win. The keys are not checked here (:func:`check_keys` does).

    Raises:
        ConfigError: an item holds something that is not ``key=value``.
    """
    out: dict[str, Any] = {}
    for item in items:
        stray = _PAIR.sub(" ", item).split()
        if stray or not item.strip():
            raise ConfigError(f"-c {item!r}: write overrides as key=value (several separated by spaces), e.g. "
                              "-c num-server-rounds=5; quote a value with spaces: -c 'resume-from=\"my runs\"'")
        for key, value in _PAIR.findall(item):
            try:
                out[key] = tomllib.loads(f"v = {value}")["v"]
            except tomllib.TOMLDecodeError:
                out[key] = value
    return out


def _typed(default: Any, key: str, value: Any) -> Any:
    """``value`` as the type of ``default``: switches by :func:`parse_bool`, name lists from comma-separated text."""
    kind = type(default)
    if kind is bool:
        return parse_bool(value, key)
    if kind is tuple:
        names = value if isinstance(value, (list, tuple)) else str(value).split(",")
        return tuple(str(n).strip() for n in names if str(n).strip())
    try:
        return kind(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{key}={value!r}: expected a {kind.__name__}") from None
