"""deploy/: the compose files, Dockerfiles, systemd units and the runbook hold together.

No Docker engine runs here (nor in CI), so nothing is built or started: the files are parsed, every file and folder
they name must exist (or be one `braintumnet certs` writes), and every Flower command line in them is handed to the
installed Flower's own argument parser, so a flag 1.42 removed (``--clientappio-api-address``, ``:9092``-era flags)
fails here instead of on a hospital's server.
"""

from __future__ import annotations

import configparser
import importlib
import re
import shlex
import sys
import tomllib
from pathlib import Path

import pytest

yaml = pytest.importorskip("yaml")  # PyYAML comes with Flower (flower-supernode reads YAML)

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
COMPOSE_FILES = sorted(DEPLOY.glob("*/compose.yml"))
UNITS = sorted((DEPLOY / "systemd").glob("*.service"))
FLWR_TAG = "1.42.0"
VAR = re.compile(r"\$\{(\w+)(?:(:?[-?])([^}]*))?\}")


# ---- parsing helpers -------------------------------------------------------------------------------------------


def env_example(compose: Path) -> dict[str, str]:
    values = {}
    for line in (compose.parent / "env.example").read_text().splitlines():
        line = line.split(" #")[0].strip()
        if line and not line.startswith("#"):
            key, _, value = line.partition("=")
            values[key.strip()] = value.strip()
    return values


def substitute(text: str, env: dict[str, str]) -> str:
    """Compose's ``${VAR}``, ``${VAR:-default}`` and ``${VAR:?message}`` with the values of env.example."""
    def one(m: re.Match) -> str:
        name, op, arg = m.group(1), m.group(2), m.group(3)
        if name in env:
            return env[name]
        if op in (":-", "-"):
            return arg
        raise AssertionError(f"${{{name}}} is used but env.example does not set it")
    return VAR.sub(one, text)


def flower_parser(command: str):
    """The installed Flower's own argparse parser for a Flower command line tool."""
    if command == "flower-superlink":
        from flwr.superlink.cli.flower_superlink import _parse_args_run_superlink

        return _parse_args_run_superlink()
    if command == "flower-supernode":
        from flwr.supernode.cli.flower_supernode import _parse_args_run_supernode

        return _parse_args_run_supernode()
    if command == "flower-superexec":
        from flwr.supercore.cli.flower_superexec import _parse_args

        return _parse_args()
    return None


def accepts(argv: list[str], where: str) -> None:
    """Assert that the real tool accepts ``argv`` (argv[0] = the command)."""
    command, args = Path(argv[0]).name, argv[1:]
    if command.startswith("python"):
        target = args[1] if args[0] == "-m" else Path(args[0]).with_suffix("").as_posix().replace("/", ".")
        module = next((m for m in ("client.run", "client.executor") if target == m or target.endswith("." + m)), None)
        assert module, f"{where}: {argv} runs neither client/run.py nor client/executor.py"
        parse_args = importlib.import_module(module).parse_args
        args = args[2:] if args[0] == "-m" else args[1:]
        _parse(parse_args, args, where)
        return
    if command == "braintumnet":
        from braintumnet.cli import build_parser

        _parse(build_parser().parse_args, args, where)
        return
    if command in ("flwr", "mlflow"):
        _click(command, args, where)
        return
    parser = flower_parser(command)
    assert parser is not None, f"{where}: unknown command {command!r}"
    _parse(parser.parse_args, args, where)


def _parse(parse, args: list[str], where: str):
    try:
        return parse(args)
    except SystemExit as exc:
        raise AssertionError(f"{where}: {args} rejected (exit {exc.code})") from None


def _click(command: str, args: list[str], where: str) -> None:
    import click

    if command == "flwr":
        import typer

        from flwr.cli.app import app

        group = typer.main.get_command(app)
    else:
        from mlflow.cli import cli as group
    ctx, cmd, rest = None, group, list(args)
    while isinstance(cmd, click.Group):
        assert rest, f"{where}: `{command} {' '.join(args)}` names no subcommand"
        name = rest.pop(0)
        sub = cmd.get_command(click.Context(cmd), name)
        assert sub is not None, f"{where}: `{command} {name}` does not exist"
        cmd = sub
    try:
        cmd.make_context(cmd.name, rest, parent=ctx, resilient_parsing=False)
    except click.ClickException as exc:
        raise AssertionError(f"{where}: `{command} {' '.join(args)}`: {exc.format_message()}") from None


# ---- compose -----------------------------------------------------------------------------------------------------


def runbook_pki(tmp_path: Path, sites: list[str]) -> Path:
    """What `braintumnet certs` writes (the compose files mount some of it)."""
    from braintumnet.certs import make_certs

    make_certs(tmp_path / "pki", dns=["superlink"], sites=sites)
    return tmp_path / "pki"


def test_there_is_a_centre_and_a_site():
    assert [p.parent.name for p in COMPOSE_FILES] == ["centre", "site"]
    assert {u.name for u in UNITS} == {"braintumnet-superlink.service", "braintumnet-serverapp.service",
                                       "braintumnet-mlflow.service", "braintumnet-site@.service",
                                       "braintumnet-site-executor@.service"}


@pytest.mark.parametrize("compose", COMPOSE_FILES, ids=lambda p: p.parent.name)
def test_compose_file_parses_and_names_existing_paths(compose, tmp_path):
    raw = compose.read_text()
    env = env_example(compose)
    doc = yaml.safe_load(substitute(raw, env))
    base = compose.parent
    named = set(doc.get("volumes") or {})
    pki = runbook_pki(tmp_path, [env.get("SITE", "yibin")])
    site = env.get("SITE", "yibin")
    (tmp_path / "superexec").write_bytes(b"x" * 32)  # the runbook's `head -c 32 /dev/urandom > ...`
    produced = {  # host path (as the compose file names it) -> the file the runbook's commands write
        "./pki/ca.crt": pki / "ca.crt", "./pki/superlink.crt": pki / "superlink.crt",
        "./pki/superlink.key": pki / "superlink.key", f"./pki/{site}.key": pki / "sites" / site / f"{site}.key",
        "./pki/superexec.secret": tmp_path / "superexec", "./secrets/superexec": tmp_path / "superexec",
    }
    for name, service in doc["services"].items():
        where = f"{compose.relative_to(REPO)}: {name}"
        image = service.get("image", "")
        if image.startswith("flwr/"):
            assert image.split(":")[1] == FLWR_TAG, f"{where}: {image} is not Flower {FLWR_TAG}"
        if "build" in service:
            context = (base / service["build"]["context"]).resolve()
            assert context.is_dir(), f"{where}: build context {context}"
            assert (context / service["build"].get("dockerfile", "Dockerfile")).is_file(), where
        for volume in service.get("volumes", []):
            source, target = volume.split(":")[:2]
            assert target.startswith("/"), f"{where}: {volume}"
            if not source.startswith((".", "/")):
                assert source in named, f"{where}: named volume {source} is not declared"
            elif source in produced:
                assert produced[source].exists(), f"{where}: {source} is not what braintumnet certs writes"
            elif source.startswith("."):
                assert (base / source).exists(), f"{where}: {source} does not exist in deploy/"
            # absolute host paths (DATA_DIR) are the hospital's own folders
        for dependency in service.get("depends_on", []):
            assert dependency in doc["services"], f"{where}: depends on unknown {dependency}"
        for secret in service.get("secrets", []):
            assert secret in (doc.get("secrets") or {}), f"{where}: secret {secret} is not declared"
        for network in service.get("networks", []):
            assert network in (doc.get("networks") or {}), f"{where}: network {network} is not declared"
    for name, secret in (doc.get("secrets") or {}).items():
        assert secret["file"] in produced, f"{compose.relative_to(REPO)}: secret {name} from {secret['file']}"
    assert "restart" in doc["services"][next(iter(doc["services"]))]


def test_site_compose_mounts_data_read_only_with_a_cache_and_a_gpu():
    doc = yaml.safe_load(substitute((DEPLOY / "site" / "compose.yml").read_text(),
                                    env_example(DEPLOY / "site" / "compose.yml")))
    for name, service in doc["services"].items():
        for volume in service.get("volumes", []):
            if volume.split(":")[1] == "/data" or "/pki" in volume:
                assert volume.endswith(":ro"), f"{name}: {volume} must be read only"
    app = doc["services"]["clientapp"]
    assert any(v.startswith("cache:/cache") for v in app["volumes"])
    devices = app["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["capabilities"] == ["gpu"]
    assert doc["services"]["supernode"]["depends_on"]["preflight"]["condition"] == "service_completed_successfully"


def test_centre_compose_is_tls_with_node_auth_and_durable_state():
    doc = yaml.safe_load(substitute((DEPLOY / "centre" / "compose.yml").read_text(),
                                    env_example(DEPLOY / "centre" / "compose.yml")))
    link = doc["services"]["superlink"]["command"]
    assert "--enable-supernode-auth" in link and not any(a.startswith("--insecure") for a in link)
    assert any(a.startswith("--database=/app/state/") for a in link)
    assert any(v.endswith(":/app/state") for v in doc["services"]["superlink"]["volumes"])
    assert list(doc["services"]["superlink"]["ports"]) == ["0.0.0.0:8000:8000"]
    mlflow = doc["services"]["mlflow"]["command"]
    assert doc["services"]["mlflow"]["environment"]["MLFLOW_BACKEND_STORE_URI"].startswith("postgresql://")
    assert "--serve-artifacts" in mlflow


def entrypoint(service: dict, base: Path) -> list[str]:
    if "entrypoint" in service:
        return list(service["entrypoint"])
    if "build" in service:
        context = (base / service["build"]["context"]).resolve()
        dockerfile = (context / service["build"].get("dockerfile", "Dockerfile")).read_text()
        return __import__("json").loads(re.findall(r"^ENTRYPOINT (.+)$", dockerfile, re.M)[-1])
    return [service["image"].split("/")[1].split(":")[0].replace("superlink", "flower-superlink")
            .replace("supernode", "flower-supernode").replace("superexec", "flower-superexec")]


@pytest.mark.parametrize("compose", COMPOSE_FILES, ids=lambda p: p.parent.name)
def test_compose_commands_are_accepted_by_the_real_tools(compose):
    doc = yaml.safe_load(substitute(compose.read_text(), env_example(compose)))
    for name, service in doc["services"].items():
        if "command" not in service or service.get("image", "").startswith("postgres"):
            continue
        argv = entrypoint(service, compose.parent) + [str(a) for a in service["command"]]
        accepts(argv, f"{compose.relative_to(REPO)}: {name}")


# ---- Dockerfiles ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dockerfile", sorted(DEPLOY.glob("*/*Dockerfile")), ids=lambda p: p.name)
def test_dockerfile_bases_and_copies(dockerfile):
    text = dockerfile.read_text()
    args = dict(re.findall(r"^ARG (\w+)=(\S*)$", text, re.M))
    base = re.findall(r"^FROM (\S+)$", text, re.M)[-1]
    base = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], base)
    if base.startswith("flwr/"):
        assert base.split(":")[1].startswith(FLWR_TAG), base
        context = REPO  # built from the repository root (the compose files say so)
        for sources in re.findall(r"^COPY (?:--\S+ )*(.+) \S+$", text, re.M):
            for source in sources.split():
                assert (context / source).exists(), f"{dockerfile.name}: COPY {source}"
        assert "USER app" in text  # never root, like Flower's own images


# ---- systemd ------------------------------------------------------------------------------------------------------


def unit_exec_start(unit: Path, service) -> list[str]:
    """ExecStart as systemd runs it for instance ``yibin``: ``%i``, ``%d`` (the unit's credentials folder) and the
    ``${VAR}`` of the unit's own Environment= lines expanded."""
    name = unit.name.replace("@.", "@yibin.")
    line = service["ExecStart"].replace("%i", "yibin").replace("%d", f"/run/credentials/{name}")
    env = {}
    for assignment in re.findall(r"^Environment=(.*)$", unit.read_text().replace("%i", "yibin"), re.M):
        env.update(pair.split("=", 1) for pair in shlex.split(assignment))
    return [re.sub(r"\$\{(\w+)\}", lambda m: env[m.group(1)], arg) for arg in shlex.split(line)]


@pytest.mark.parametrize("unit", UNITS, ids=lambda p: p.name)
def test_systemd_unit_parses_and_runs_an_existing_command(unit):
    # strict=False: systemd repeats keys (Environment=, LoadCredential=); the ones read here are set once.
    parser = configparser.ConfigParser(interpolation=None, strict=False)
    parser.optionxform = str  # systemd keys are case-sensitive
    parser.read_string(unit.read_text())
    assert set(parser.sections()) == {"Unit", "Service", "Install"}
    service = parser["Service"]
    assert service["User"].startswith("braintumnet-") and service["Restart"] == "always"
    argv = unit_exec_start(unit, service)
    tool = Path(argv[0])
    assert tool.parent == Path("/opt/braintumnet/.venv/bin"), argv[0]
    assert (Path(sys.executable).parent / tool.name).exists(), f"{tool.name} is not installed by the project"
    for arg in argv[1:]:
        if arg.startswith("/opt/braintumnet/") and not arg.startswith("/opt/braintumnet/.venv"):
            assert (REPO / arg.removeprefix("/opt/braintumnet/")).exists(), arg
    accepts(argv, unit.name)


# ---- the runbook ----------------------------------------------------------------------------------------------------


def runbook_commands(path: Path) -> list[tuple[int, list[str]]]:
    """Every command in the ```bash blocks: continuation lines joined, `&&` chains and pipes split, comments
    dropped."""
    text = path.read_text()
    out = []
    for block in re.finditer(r"```bash\n(.*?)```", text, re.S):
        line_no = text[:block.start()].count("\n") + 2
        joined = re.sub(r"\\\n\s*", " ", block.group(1))
        for line in joined.splitlines():
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            for part in re.split(r"\s(?:&&|\|)\s", line):
                argv = shlex.split(part, comments=True)
                if argv and argv[-1] == "&":
                    argv = argv[:-1]
                if argv:
                    out.append((line_no, argv))
    return out


PLACEHOLDERS = {"RUN_ID": "7", "NODE_ID": "7", "OLD_NODE_ID": "7"}


def test_runbook_commands_exist_and_parse():
    commands = runbook_commands(DEPLOY / "README.md")
    ours = {"braintumnet", "python", "flwr", "flower-superlink", "flower-superexec"}
    checked = 0
    for line_no, argv in commands:
        if argv[0] == "sudo":
            argv = argv[1:]
        name = Path(argv[0]).name
        if name.startswith("python") and "client/run.py" not in " ".join(argv[:2]):
            continue  # `python3.12 -m venv`
        if name in ours or name.startswith("python") or name in ("braintumnet", "flwr"):
            argv = [PLACEHOLDERS.get(a, a) for a in argv]
            accepts(argv, f"deploy/README.md, block at line {line_no}")
            checked += 1
    assert checked >= 25, checked


def test_runbook_links_and_toml_snippets():
    text = (DEPLOY / "README.md").read_text()
    for target in re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", text):
        if not target.startswith("http"):
            assert (DEPLOY / target).exists(), f"deploy/README.md links to missing {target}"
    for snippet in re.findall(r"```toml\n(.*?)```", text, re.S):
        tomllib.loads(snippet)
    security = (DEPLOY / "SECURITY.md").read_text()
    for needle in ("TLS", "SuperNode authentication", "differential privacy", "user authentication"):
        assert needle.lower() in security.lower(), needle


def test_secrets_stay_off_command_lines_and_mlflow_answers_the_servers_host():
    """The tracking store's password is in the environment, not in a command line any host process can read; MLflow
    3 refuses Host headers it does not allow, and the ServerApp calls it mlflow:5000."""
    centre = (DEPLOY / "centre" / "compose.yml").read_text()
    doc = yaml.safe_load(substitute(centre, env_example(DEPLOY / "centre" / "compose.yml")))
    mlflow = doc["services"]["mlflow"]
    assert not any("postgresql://" in str(arg) for arg in mlflow.get("command", []))
    assert "postgresql://" in mlflow["environment"]["MLFLOW_BACKEND_STORE_URI"]
    assert "mlflow:5000" in mlflow["environment"]["MLFLOW_SERVER_ALLOWED_HOSTS"].split(",")
    assert "mlflow:5000" in doc["services"]["serverapp"]["environment"]["MLFLOW_TRACKING_URI"]


def test_a_site_unit_does_not_retry_a_mistake_that_needs_a_person():
    from braintumnet.errors import EXIT_NOTHING_USABLE, EXIT_USER_ERROR

    unit = (DEPLOY / "systemd" / "braintumnet-site@.service").read_text()
    prevent = [line.split("=", 1)[1].split() for line in unit.splitlines()
               if line.startswith("RestartPreventExitStatus=")]
    assert prevent and {str(EXIT_USER_ERROR), str(EXIT_NOTHING_USABLE)} <= set(prevent[0])
