"""What each arm of the study trains on and how it is scored: the federated budgets, the training cases left after
a held-out fold, the whole-scan scores on every test set, the optimizer steps each arm takes."""

from __future__ import annotations

import time

from braintumnet.config import Profile, site_batch
from braintumnet.data.dataset import select_slices
from braintumnet.scoring import evaluate_cases, evaluate_model, evaluate_sites


BUDGETS = ("epochs", "wall-time")


def federated_arm_name(budget: str) -> str:
    return "federated" if budget == "epochs" else f"federated:{budget}"


def federated_local_epochs(budget: str, local_epochs: int, internal, classes, held: dict) -> int:
    """Local epochs per round of the federated arm under ``budget`` (``BUDGETS``).

    ``wall-time``: the sites train in parallel, so in the wall time the centralized model takes for E epochs over
    the pooled slices, the largest site can pass over its own slices E x pooled / largest times.
    """
    if budget == "epochs":
        return local_epochs
    sizes = [len(select_slices([s], "train", classes, training_cases([s], classes, held))) for s in internal]
    return max(local_epochs, round(local_epochs * sum(sizes) / max(max(sizes), 1)))


def strategy_words(profile: Profile) -> str:
    server = profile.server.optimizer
    return "FedAvg" if server == "none" else f"FedAvg with server optimizer {server}"


def training_cases(train_sites, classes, held: dict) -> list[str] | None:
    """The training cases left after each site's held-out fold (None = all of them)."""
    if not held:
        return None
    table = select_slices(train_sites, "train", classes)
    return sorted(set(table["case_id"]) - {c for s in train_sites for c in held.get(s.site, [])})


def score_model(model, internal, ext, profile: Profile, dev, held: dict) -> tuple[dict, dict]:
    t0 = time.perf_counter()
    metrics, per_case = {}, {}
    metrics["internal_test"], per_case["internal_test"], per_site = evaluate_sites(model, internal, "test", profile,
                                                                                   dev, progress=False)
    if ext:
        metrics["external"], per_case["external"] = evaluate_cases(model, ext, None, profile, dev, progress=False)
    scores = {k: _numbers(v) for k, v in metrics.items()}
    scores.setdefault("external", {})
    scores["per_site"] = {site: _numbers(m) for site, m in per_site.items()}
    if held:
        ids = sorted(c for v in held.values() for c in v)
        scores["validation"] = _numbers(evaluate_model(model, internal, "train", profile, dev, case_ids=ids,
                                                       progress=False))
    scores["wall_s"] = time.perf_counter() - t0
    return scores, per_case


def _numbers(metrics: dict) -> dict:
    return {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and k != "num-examples"}


def optimizer_steps(internal: list, classes, train, epochs: int, fed) -> dict:
    """Adam steps each arm's model takes (no cross-validation), to put beside the equal-epochs budget.

    Equal epochs are not equal progress: centralized takes one step per pooled batch (``train.batch_size``), while
    FedAvg's global model moves each round by an average of the sites' steps, not their sum, so along its trajectory
    it takes about rounds x local epochs x one site's batches per epoch (``train.site_batch_size``; a smaller batch
    than the pooled one brings the two counts nearer). A local arm takes the same steps as one federated site.
    """
    def steps(n_slices: int, batch_size: int) -> int:  # train_model drops a last partial batch when there are more
        return n_slices // batch_size if n_slices > batch_size else 1

    per_site = {s.site: len(select_slices([s], "train", classes)) for s in internal}
    site = site_batch(train)
    per_round = {name: fed.local_epochs * steps(n, site) for name, n in per_site.items()}
    return {"train_slices": per_site, "batch_size": train.batch_size, "site_batch_size": site,
            "centralized_steps": epochs * steps(sum(per_site.values()), train.batch_size),
            "local_steps": {name: epochs * steps(n, site) for name, n in per_site.items()},
            "federated_steps_per_site": {name: fed.num_rounds * n for name, n in per_round.items()}}

