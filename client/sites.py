"""Where a site's data, cache and device come from, for the launcher and for the ClientApp.

Three sources, one result (a :class:`braintumnet.data.loading.SiteRuntime`, which the core's ``open_site`` opens):

- the **site config file** (``client/sites.toml`` format, read by ``python client/run.py``), which the launcher turns
  into the SuperNode's ``--node-config``;
- the **node config** in deployment: ``site-name``, ``data-path``, ``cache-dir``, ``device`` and ``site-config``
  (the site config file, where the ClientApp reads the site's policy and state directory) and ``role``
  (``training``, or ``evaluate-only`` for the external hospital: :data:`braintumnet.protocol.ROLES`)
  (:data:`NODE_KEYS`);
- in **simulation**, where Flower gives a node only ``partition-id``: the run config's ``sites`` list maps the
  partition to a site of the phantom cohort, which ``open_site`` generates (once, under a lock) if it is missing; an
  entry ``NAME:evaluate-only`` makes that partition an evaluate-only site.

Nothing here imports ``flwr``.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

from braintumnet.config import app_config, resolve
from braintumnet.errors import BrainTumNetError
from braintumnet.protocol import ROLES, TRAINING, site_entry
from braintumnet.site_policy import SIMULATION_POLICY, SitePolicy, default_state_dir, policy_from_table

if TYPE_CHECKING:  # imported where used: the core's data loading brings pandas and numpy, which the launcher skips
    from braintumnet.data.loading import SiteRuntime

REPO = Path(__file__).resolve().parents[1]
DEFAULT_SITES_FILE = REPO / "client" / "sites.toml"
# node_config keys the launcher writes and the ClientApp reads.
NODE_KEYS = ("site-name", "data-path", "cache-dir", "device", "site-config", "role")
# Keys a site table may hold (kebab-case, as in the file).
SITE_KEYS = {"data", "cache", "device", "superlink", "root-certificates", "auth-key", "port", "run-config",
             "allowed-apps", "superexec-secret", "policy", "state-dir", "role"}


@dataclass(frozen=True)
class SiteSettings:
    """One site's launcher settings, after ``[defaults]``, ``[site.NAME]`` and the command-line flags.

    Args:
        name: the site's name; it must equal ``dataset.json``'s ``site``.
        data: the site folder (the data contract of docs/data.md), read only.
        cache: the prepared-cache root.
        device: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``.
        superlink: the centre's SuperLink as ``host:port``.
        root_certificates: the CA certificate (PEM) that signed the SuperLink's certificate; None = no TLS.
        auth_key: the SuperNode authentication private key; None = no node authentication.
        port: this SuperNode's local Runtime API port; None = pick a free one.
        run_config: run-config overrides naming the data settings to prepare the cache for.
        config_file: the site config file these settings came from; the ClientApp reads the site's policy there.
        policy: the site's own rules (``policy`` table; :class:`braintumnet.site_policy.SitePolicy`).
        state_dir: where the site keeps its privacy ledger and evaluation count (``state-dir``).
        allowed_apps: the FAB allow-list (SHA-256 hashes of the apps this site runs); None = none configured.
        superexec_secret: the SuperNode/executor shared secret file; None = a new one per launch.
        role: ``training`` (trains and evaluates) or ``evaluate-only`` (the external hospital: scores the global
            model every round on all its cases, never trains, never sends arrays).
    """

    name: str
    data: Path
    cache: Path
    device: str = "auto"
    superlink: str = "127.0.0.1:8000"
    root_certificates: Path | None = None
    auth_key: Path | None = None
    port: int | None = None
    run_config: dict[str, Any] = field(default_factory=dict)
    config_file: Path | None = None
    policy: SitePolicy = field(default_factory=SitePolicy)
    state_dir: Path = field(default_factory=default_state_dir)
    allowed_apps: Path | None = None
    superexec_secret: Path | None = None
    role: str = TRAINING

    def node_config(self) -> str:
        """The ``--node-config`` string: TOML values, strings quoted (Flower rejects ``site-name=yibin``)."""
        values = {"site-name": self.name, "data-path": str(self.data), "cache-dir": str(self.cache),
                  "device": self.device}
        if self.role != TRAINING:  # absent = training: a training site's node config stays as it always was
            values["role"] = self.role
        if self.config_file is not None:
            values["site-config"] = str(self.config_file)
        return " ".join(f"{k}={node_config_value(k, v)}" for k, v in values.items())


def _flat(table: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"data": {"img-size": 32}}`` -> ``{"data.img-size": 32}`` (run-config keys are dotted)."""
    out: dict[str, Any] = {}
    for key, value in table.items():
        if isinstance(value, Mapping):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def node_config_value(key: str, value: str) -> str:
    """A TOML string Flower's ``--node-config`` parser reads back intact (it splits on the first closing quote).

    ``"value"`` when possible, ``'value'`` (a TOML literal string) when the value holds ``"`` or ``\\``.

    Raises:
        BrainTumNetError: the value holds both kinds of quote, which no form can carry.
    """
    if '"' not in value and "\\" not in value:
        return f'"{value}"'
    if "'" not in value:
        return f"'{value}'"
    raise BrainTumNetError(f"{key}={value!r}: a path with both ' and \" cannot be passed to the SuperNode; "
                           "rename the folder or use a symbolic link")


def read_sites_file(path: Path) -> dict[str, Any]:
    """Parse a site config file; a missing or malformed file is a user error naming the file."""
    path = Path(path)
    if not path.is_file():
        raise BrainTumNetError(f"{path}: no such site config file; pass --config FILE (format: docs/federation.md)")
    try:
        doc = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise BrainTumNetError(f"{path}: not a valid TOML site config ({exc}); see docs/federation.md") from None
    unknown = set(doc) - {"defaults", "site"}
    if unknown:
        raise BrainTumNetError(f"{path}: unknown table(s) {sorted(unknown)}; use [defaults] and [site.NAME]")
    for where, table in [("defaults", doc.get("defaults", {}))] + [
            (f"site.{n}", t) for n, t in doc.get("site", {}).items()]:
        if not isinstance(table, dict):
            raise BrainTumNetError(f"{path}: [{where}] must be a table")
        bad = set(table) - SITE_KEYS
        if bad:
            raise BrainTumNetError(f"{path}: [{where}] has unknown key(s) {sorted(bad)}; "
                                   f"known keys: {sorted(SITE_KEYS)}")
    return doc


def site_settings(path: Path, site: str, overrides: Mapping[str, Any] | None = None) -> SiteSettings:
    """``[defaults]`` then ``[site.<site>]`` of the file at ``path``, then ``overrides`` (the flags; None = unset).

    Relative paths in the file are relative to the file's folder; ``~`` is expanded. A site the file does not
    describe is accepted only when the flags give its data folder (``overrides["data"]``).

    Raises:
        BrainTumNetError: the site is unknown (the message lists the ones the file describes), or a value is invalid.
    """
    path = Path(path).absolute()
    overrides = {k: v for k, v in (overrides or {}).items() if v is not None}
    doc = read_sites_file(path) if path.is_file() or "data" not in overrides else {}
    sites = doc.get("site", {})
    if site not in sites and "data" not in overrides:
        known = ", ".join(sorted(sites)) or "none"
        raise BrainTumNetError(f"unknown site {site!r}: {path} describes {known}; add a [site.{site}] table or "
                               "pass --config with the right file (or --data DIR)")
    defaults, table = doc.get("defaults", {}), sites.get(site, {})
    merged: dict[str, Any] = {**defaults, **table}
    merged["run-config"] = {**_flat(defaults.get("run-config", {})), **_flat(table.get("run-config", {}))}
    for key, value in overrides.items():
        merged[key] = value
        if key in ("data", "cache", "root-certificates", "auth-key", "allowed-apps"):
            merged[key] = Path(value).expanduser().absolute()  # flags are relative to the shell's folder
    base = path.parent

    def as_path(key: str) -> Path | None:
        value = merged.get(key)
        if value in (None, ""):
            return None
        p = Path(str(value)).expanduser()
        return p if p.is_absolute() else (base / p).resolve()

    data = as_path("data")
    if data is None:
        raise BrainTumNetError(f"site {site!r}: no data folder; set data = \"...\" in [site.{site}] of {path} "
                               "or pass --data DIR")
    from braintumnet.data.loading import default_cache_root

    policy, state_dir = _policy_and_state(doc, site, path)
    role = merged.get("role", TRAINING)
    if role not in ROLES:
        raise BrainTumNetError(f"site {site!r}: role={role!r} in {path}: use one of {', '.join(ROLES)} (evaluate-only: "
                               "the external hospital, which scores the global model and never trains)")
    port = merged.get("port")
    if port is not None and not (isinstance(port, int) and 0 < port < 65536):
        raise BrainTumNetError(f"site {site!r}: port={port!r} must be a TCP port number (1-65535)")
    return SiteSettings(
        name=site,
        data=data,
        cache=as_path("cache") or default_cache_root(),
        device=str(merged.get("device", "auto")),
        superlink=str(merged.get("superlink", "127.0.0.1:8000")),
        root_certificates=as_path("root-certificates"),
        auth_key=as_path("auth-key"),
        port=port,
        run_config=dict(merged["run-config"]),
        config_file=path if doc else None,
        policy=policy,
        state_dir=state_dir,
        allowed_apps=as_path("allowed-apps"),
        superexec_secret=as_path("superexec-secret"),
        role=role,
    )


def site_from_context(node_config: Mapping[str, Any], run_config: Mapping[str, Any]) -> SiteRuntime:
    """The site this ClientApp serves.

    Deployment: ``site-name`` (and ``data-path``, ``cache-dir``, ``device``) from the SuperNode's ``--node-config``.
    Simulation: ``partition-id`` picks a name from the run config's ``sites``; data come from the phantom cohort
    under ``phantom-dir`` (generated on first use), the cache from ``cache-dir``.

    Raises:
        BrainTumNetError: neither a site name nor a partition id, or a partition beyond the site list.
    """
    from braintumnet.data.loading import SiteRuntime, default_cache_root

    app = app_config(run_config)
    default_cache = Path(app.cache_dir).expanduser().absolute() if app.cache_dir else default_cache_root()
    if "site-name" in node_config:
        data = node_config.get("data-path")
        cache = node_config.get("cache-dir")
        return SiteRuntime(
            name=str(node_config["site-name"]),
            data=Path(str(data)) if data else None,
            cache=Path(str(cache)) if cache else default_cache,
            device=str(node_config.get("device", app.device)),
        )
    if "partition-id" not in node_config:
        raise BrainTumNetError("this SuperNode has no site-name in its node config; start it with "
                               "python client/run.py --site NAME (it sets --node-config site-name=...)")
    names = simulation_sites(run_config)
    pid = int(node_config["partition-id"])
    if pid >= len(names):
        raise BrainTumNetError(f"simulation partition {pid} has no site: the run config's sites lists {names}; "
                               f"use num-supernodes <= {len(names)} or list more sites")
    return SiteRuntime(name=names[pid], data=phantom_root(run_config, default_cache) / names[pid],
                       cache=default_cache, device=app.device, phantom=phantom_settings(run_config))


def simulation_sites(run_config: Mapping[str, Any]) -> list[str]:
    """The names of the run config's ``sites`` (comma-separated; default and type: ``braintumnet.config.AppConfig``):
    partition i of a simulation is site i."""
    return [name for name, _ in simulation_roles(run_config)]


def simulation_roles(run_config: Mapping[str, Any]) -> list[tuple[str, str]]:
    """``(name, role)`` of each entry of the run config's ``sites`` (``NAME`` or ``NAME:evaluate-only``).

    Raises:
        BrainTumNetError: an entry with an unknown role.
    """
    try:
        return [site_entry(entry) for entry in app_config(run_config).sites]
    except ValueError as exc:
        raise BrainTumNetError(f"run config: {exc}") from None


def site_role(node_config: Mapping[str, Any], run_config: Mapping[str, Any]) -> str:
    """The role of the site this ClientApp serves: its node config's ``role`` (deployment; none = training), or its
    partition's entry in the run config's ``sites`` (simulation). The centre's messages have no say in it."""
    if "site-name" in node_config:
        role = str(node_config.get("role", TRAINING))
        if role not in ROLES:
            raise BrainTumNetError(f"node config role={role!r}: use one of {', '.join(ROLES)} (set role in the site "
                                   "config file and start the site with python client/run.py)")
        return role
    roles = simulation_roles(run_config)
    pid = int(node_config.get("partition-id", 0))
    return roles[pid][1] if pid < len(roles) else TRAINING


def phantom_root(run_config: Mapping[str, Any], cache_root: Path) -> Path:
    """``phantom-dir`` if set, else ``<cache root>/phantom-s<scale>-seed<seed>``."""
    explicit = app_config(run_config).phantom_dir
    if explicit:
        return Path(explicit).expanduser().absolute()
    scale, seed = phantom_settings(run_config)
    return cache_root / f"phantom-s{scale:g}-seed{seed}"


def phantom_settings(run_config: Mapping[str, Any]) -> tuple[float, int]:
    """``phantom-scale`` and ``phantom-seed`` of the run config (the simulated cohort's size and seed)."""
    app = app_config(run_config)
    return app.phantom_scale, app.phantom_seed


def site_policy(path: Path, site: str) -> tuple[SitePolicy, Path]:
    """The site's policy and state directory from its site config file (``[defaults]`` then ``[site.<site>]``).

    Raises:
        BrainTumNetError: the file is missing or malformed, or its policy has an unknown key or a bad value.
    """
    path = Path(path).absolute()
    return _policy_and_state(read_sites_file(path), site, path)


def state_summary(settings: SiteSettings) -> list[str]:
    """The preflight's lines on the site's policy and state directory (``python client/run.py --check``).

    Reads the privacy ledger and the evaluation count (under their locks, without computing any ε), so a ledger that
    went missing or a half-written line is found before the SuperNode starts, not in the first round.

    Raises:
        BrainTumNetError: a journal is missing although its marker or witness says it existed, or is unreadable.
    """
    from braintumnet.site_policy import EVALUATIONS, LEDGER, site_journal

    counts = []
    for name in (LEDGER, EVALUATIONS):
        journal = site_journal(settings.state_dir, settings.name, name, settings.cache)
        with journal.locked():
            counts.append(len(journal.entries()))
    source = settings.config_file or "no site config: the defaults"
    return [f"site policy:    {source}", *settings.policy.summary(),
            f"state dir:      {settings.state_dir} ({counts[0]} trained rounds in the privacy ledger, {counts[1]} "
            "evaluations)"]


def site_policy_from_context(node_config: Mapping[str, Any], site: SiteRuntime) -> tuple[SitePolicy, Path]:
    """The policy and state directory of the site this ClientApp serves; the run config has no say in either.

    Deployment: from the site config file the launcher named in ``site-config``; a SuperNode started without one
    gets the default (hospital) policy and state directory. Simulation (no ``site-name``): the tester's synthetic
    sites allow everything (:data:`~braintumnet.site_policy.SIMULATION_POLICY`) and keep their state beside their
    cache.
    """
    if "site-name" not in node_config:
        return SIMULATION_POLICY, site.cache / "simulated-site-state"
    config = node_config.get("site-config")
    if config:
        return site_policy(Path(str(config)), site.name)
    return _policy_and_state({}, site.name, Path("(no site config)"))


def _policy_and_state(doc: Mapping[str, Any], site: str, path: Path) -> tuple[SitePolicy, Path]:
    """``policy`` keys merged one by one (``[defaults.policy]``, then ``[site.NAME.policy]``); ``allowed-data``
    defaults to the data settings of the merged ``run-config``; ``state-dir`` relative to the file's folder."""
    defaults, table = doc.get("defaults", {}), doc.get("site", {}).get(site, {})
    policy: dict[str, Any] = {}
    for where, t in (("defaults", defaults), (f"site.{site}", table)):
        if not isinstance(t.get("policy", {}), Mapping):
            raise BrainTumNetError(f"{path}: [{where}] policy must be a table, e.g. [{where}.policy]")
        policy.update(t.get("policy", {}))
    run_config = {**_flat(defaults.get("run-config", {})), **_flat(table.get("run-config", {}))}
    try:
        data = resolve(run_config).data
    except ValueError as exc:
        raise BrainTumNetError(f"{path}: the run-config of site {site}: {exc}") from None
    where = f"{path} [defaults.policy] / [site.{site}.policy]"
    state = table.get("state-dir", defaults.get("state-dir"))
    if state is not None and not (isinstance(state, str) and state):
        raise BrainTumNetError(f"{path}: state-dir = {state!r}: use a folder, e.g. "
                               'state-dir = "/var/lib/braintumnet"')
    state_dir = Path(state).expanduser() if state else default_state_dir()
    return policy_from_table(policy, data, where), (state_dir if state_dir.is_absolute()
                                                    else (path.parent / state_dir).resolve())
