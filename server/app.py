"""The coordinating centre's ServerApp: FedAvg over the hospitals, checkpoints, resume, MLflow.

The external hospital is an evaluate-only site (its own node config says so; ``server/strategy.py`` asks each node
its role before sending a model): its scores of every round's model are the round's ``external`` entry, and its data
never leave it. ``external-data`` is only for a public benchmark set the centre may hold itself (filed as
``benchmark``).

Run config (``[tool.flwr.app.config]``, overridden with ``flwr run . <connection> -c "key=value"``): the typed
profile keys of ``braintumnet.config`` plus ``checkpoint-dir``, ``resume-from``, ``external-data``, ``cache-dir``,
``sites`` and ``mlflow-experiment`` (see ``server.settings.ServerSettings`` and docs/federation.md).
``num-server-rounds`` is the federation's total: a run resumed after round 3 of 10 trains rounds 4..10.
"""

from __future__ import annotations

import logging
import uuid
from pathlib import Path

from flwr.app import ArrayRecord, ConfigRecord, Context
from flwr.serverapp import Grid, ServerApp

from braintumnet.logs import setup_logging
from braintumnet.errors import BrainTumNetError
from braintumnet.protocol import TOTAL_ROUNDS
from server.checkpoints import RunFolder, find_resume_point, load_server_optimizer
from server.optimizers import make_strategy
from server.settings import ServerSettings, server_optimizer_params
from server.tracking import Tracker

log = logging.getLogger("braintumnet.server")
app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    from braintumnet.checkpoint import load_checkpoint
    from braintumnet.config import resolve, to_dict
    from braintumnet.data.contract import class_names
    from braintumnet.engine import build_model, seed_everything

    setup_logging()
    _retry_superlink_500s()
    profile = resolve(context.run_config)
    settings = ServerSettings.from_run_config(context.run_config)
    classes = class_names(profile.data.task)
    folder = RunFolder(settings.checkpoint_dir, context.run_id)
    resume = find_resume_point(settings.checkpoint_dir, settings.resume_from)

    seed_everything(profile.train.seed)
    model = build_model(profile, len(classes))
    meta = {"federation-id": uuid.uuid4().hex, "flwr-run-id": str(context.run_id), "resumed-from": None,
            "model_fp32_bytes": sum(4 * t.numel() for t in model.state_dict().values())}
    done, best = 0, None
    if resume is not None:
        checkpoint = load_checkpoint(resume.path)
        _check_compatible(checkpoint.profile, profile, resume.path)
        model.load_state_dict(checkpoint.state_dict)
        done, best = resume.round, resume.meta.get("best_value")
        meta.update({"federation-id": resume.meta.get("federation-id", meta["federation-id"]),
                     "resumed-from": str(resume.path), "site-nodes": resume.meta.get("site-nodes", {})})
        log.info("resuming from %s: round %d of %d done", resume.path, done, profile.federation.num_rounds)
    remaining = profile.federation.num_rounds - done
    log.info("run %s: %d round(s) to go; run folder %s", context.run_id, max(remaining, 0), folder.dir)

    external_eval = _external_evaluator(settings, profile)
    tracker = Tracker(settings.checkpoint_dir, settings.mlflow_experiment, f"federation-{context.run_id}",
                      meta["federation-id"], {**to_dict(profile), **_settings_params(settings),
                                              **_server_optimizer_params(profile)},
                      {"flwr-run-id": str(context.run_id)}, enabled=bool(settings.mlflow_experiment))
    strategy = make_strategy(profile, settings, folder=folder, tracker=tracker, class_names=classes,
                             round_offset=done, best_value=best, external_eval=external_eval, meta=meta)
    if resume is not None and profile.server.optimizer != "none":
        strategy.restore_server_optimizer_state(load_server_optimizer(resume, profile.server.optimizer))
    status = "FAILED"
    try:
        state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
        if remaining > 0:
            strategy.start(grid=grid, initial_arrays=ArrayRecord(state), num_rounds=remaining,
                           timeout=profile.federation.round_timeout_s,
                           train_config=ConfigRecord({TOTAL_ROUNDS: profile.federation.num_rounds}),
                           evaluate_config=ConfigRecord({}))
            state = strategy.arrays.to_torch_state_dict()  # Flower's Result.arrays is empty if no round counted
        final = folder.save_final(state, profile, classes, {
            **meta, "round": max(done, profile.federation.num_rounds), "best_value": strategy.best_value,
            "site-nodes": strategy.names.as_meta()})
        tracker.artifact(final)
        log.info("federation finished: final model %s, best federated %s %s", final, "dice_tumor",
                 strategy.best_value)
        status = "FINISHED"
    finally:
        tracker.close(status)


def _retry_superlink_500s() -> None:
    """Let this process's Flower clients retry a SuperLink's HTTP 500 like a 502/503/504.

    Flower 1.42 treats a 500 as fatal, and an SQLite-backed SuperLink (``--database``) on a busy machine answers
    "500: database is locked" now and then: the ServerApp's task-heartbeat thread then dies and the SuperLink fails the
    run ("No heartbeat received from the task"). Flower retries with its own backoff (at most 20 s apart) and logs each
    try. Patching a private constant is deliberate and guarded: if Flower renames it, nothing changes.
    """
    try:
        from flwr.supercore.retry import http_retry
    except ImportError:
        return
    codes = getattr(http_retry, "_RETRYABLE_STATUS_CODES", None)
    if isinstance(codes, frozenset) and 500 not in codes:
        http_retry._RETRYABLE_STATUS_CODES = codes | {500}


def _check_compatible(saved, profile, path: Path) -> None:
    """A resumed run must build the same network as the checkpoint's, and step it with the same server optimizer (its
    moments belong to that one; its hyperparameters may change)."""
    same = (saved.model == profile.model and saved.data.img_size == profile.data.img_size
            and saved.data.task == profile.data.task)
    if not same:
        raise BrainTumNetError(
            f"{path}: trained with model {saved.model}, img_size {saved.data.img_size}, task {saved.data.task}; "
            f"this run asks for model {profile.model}, img_size {profile.data.img_size}, task {profile.data.task}. "
            "Resume with the original run config, or start without resume-from")
    if saved.server.optimizer != profile.server.optimizer:
        raise BrainTumNetError(
            f"{path}: trained with strategy.server-optimizer={saved.server.optimizer}; this run asks for "
            f"{profile.server.optimizer}, and the checkpoint's server-optimizer state belongs to the first. Resume "
            f"with strategy.server-optimizer={saved.server.optimizer}, or start without resume-from")


def _settings_params(settings: ServerSettings) -> dict:
    return {"server.resume-from": settings.resume_from or "-", "server.external-data": settings.external_data or "-",
            "server.sites": ",".join(settings.sites) or "-", "server.audit-messages": settings.audit_messages}


def _server_optimizer_params(profile) -> dict:
    """The hyperparameters the server step uses (Flower's defaults filled in), beside the run config's ``server.*``."""
    return {f"server-optimizer.{k}": v for k, v in server_optimizer_params(profile).items() if k != "name"}


def _external_evaluator(settings: ServerSettings, profile):
    """The centre's evaluation on ``external-data`` (a site folder or a prepared cache), or None if unset.

    Only for a public benchmark set: a hospital's cohort held here would defeat the federation's purpose (the
    external hospital is an evaluate-only site: docs/federation.md, "The external hospital")."""
    if not settings.external_data:
        return None
    from braintumnet.data.cache import load_prepared, read_meta
    from braintumnet.data.contract import class_names
    from braintumnet.data.loading import default_cache_root, prepare_and_load
    from braintumnet.engine import build_model, pick_device
    from braintumnet.scoring import evaluate_model

    source = Path(settings.external_data).expanduser().absolute()
    if read_meta(source) is not None:
        external = load_prepared(source)
    elif (source / "dataset.json").is_file():
        cache = Path(settings.cache_dir).expanduser().absolute() if settings.cache_dir else default_cache_root()
        external = prepare_and_load(source, cache, profile.data, progress=False)
    else:
        raise BrainTumNetError(f"external-data={source}: neither a site folder (dataset.json) nor a prepared cache "
                               "(prepared.json); give one of them, or external-data=\"\" to skip")
    device = pick_device("auto")
    log.warning("external-data: the centre scores every round's model on %s (%d slices, on %s), filed as "
                "benchmark. Use this for a public benchmark set only: a hospital's cohort stays at the hospital, which "
                "joins as an evaluate-only site (role = \"evaluate-only\" in its site config)", external.site,
                len(external), device)

    def evaluate(state: dict) -> dict:
        model = build_model(profile, len(class_names(profile.data.task)))
        model.load_state_dict(state)
        return evaluate_model(model, [external], None, profile, device, progress=False)

    return evaluate


