"""The data of ``graftfl audit``: the attacker's auxiliary records and the evaluator's ground truth.

Two different holders, kept apart on purpose:

- **the attacker** gets only :func:`auxiliary_data`: public records of the registry dataset's
  test split, which no site trains on (sites hold partitions of the train split);
- **the evaluator** (this command, scoring an attack) re-derives the sites' rows from the
  run's config — :func:`site_train_rows` and :func:`recorded_rows`, which replay the site's
  own seeded batch order (under DP-SGD: the Poisson batches of a site given an audit sampling
  seed, :func:`poisson_row_indices`) — only to compare reconstructions and guesses with the
  truth. An attack never sees them; this is the evaluator's privilege, not the attacker's.
"""

from __future__ import annotations

from types import SimpleNamespace

import torch

from graftfl.clients.site_data import site_rows
from graftfl.clients.split_defences import AUDIT_SAMPLING_ENV, AUDIT_SAMPLING_NODE_CONFIG, audit_sampling_seed
from graftfl.clients.split_turns import PROGRESS_KEY, turn_batches
from graftfl.config import is_site_dataset
from graftfl.core.data import dataset_from_config
from graftfl.core.split import hidden_label_mask
from graftfl.core.split_private import audit_sampling_generator, poisson_indices


class NotAuditable(ValueError):
    """The run cannot be audited as asked (e.g. ``dataset=site``: no public data to be the attacker's)."""


def _site_context(cfg, partition: int) -> SimpleNamespace:
    """The node facts a simulated site has (``partition-id``, ``num-partitions``) and an empty state."""
    return SimpleNamespace(node_config={"partition-id": int(partition), "num-partitions": int(cfg.num_clients)}, state={})


def auxiliary_data(cfg, size: int) -> dict:
    """The attacker's auxiliary records and a disjoint set of non-members, from the public test split.

    The test split is ordered by the run's seeded permutation (the one that picks the server's
    evaluation subset, ``dataset.test_size``); rows after that subset come first, so the
    attacker's records avoid the server's evaluation rows where the split allows it. The
    first half (at most ``size``) is the auxiliary data, the rest (at most ``size``) the
    non-members of membership inference. No site trains on the test split.
    """
    if is_site_dataset(cfg):
        raise NotAuditable("dataset=site: the audit needs a public registry dataset for the attacker's auxiliary data (e.g. dataset=digits)")
    try:
        data = dataset_from_config(cfg.dataset)  # the fixed per-dataset statistics, public like the dataset
    except ValueError as err:  # normalization=federated: the statistics the sites agreed on are not in the config
        raise NotAuditable(f"{err}; audit a run with dataset.normalization=fixed") from err
    order = torch.randperm(len(data.test_y), generator=torch.Generator().manual_seed(int(cfg.seed)))
    evaluation = int(cfg.dataset.get("test_size") or 0)
    outside = order[evaluation:] if 0 < evaluation < len(order) else order
    half = min(int(size), len(outside) // 2)
    aux, nonmembers = outside[:half], outside[half : half + int(size)]
    source = (f"{cfg.dataset.name} test split: {half} rows outside the server's evaluation subset (dataset.test_size={evaluation})"
              if 0 < evaluation < len(order) else f"{cfg.dataset.name} test split (no site trains on it): {half} rows")
    return {"x": data.test_x[aux], "y": data.test_y[aux], "nonmember_x": data.test_x[nonmembers], "nonmember_y": data.test_y[nonmembers],
            "source": source, "size": int(half), "nonmembers": int(len(nonmembers)), "num_classes": data.num_classes,
            "input_shape": tuple(data.input_shape)}


def site_train_rows(cfg, partition: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Evaluator only: the rows site ``partition`` trains on, as the site derives them."""
    x, y, _, _ = site_rows(cfg, _site_context(cfg, partition))
    return x, y


def turn_row_indices(cfg, partition: int, turn_number: int, num_rows: int) -> list[torch.Tensor]:
    """Evaluator only: the row indices of each batch of the site's ``turn_number``-th completed turn (1-based).

    Replays :func:`graftfl.clients.split_turns.turn_batches` from the first turn, as the
    site's progress advances with each turn it completes.
    """
    context = _site_context(cfg, partition)
    batches: list[torch.Tensor] = []
    for _ in range(int(turn_number)):
        batches, progress = turn_batches(cfg, context, num_rows, int(partition))
        context.state[PROGRESS_KEY] = progress
    return batches


def site_turn(entry: dict) -> int:
    """Which of its turns a recorded split turn was: the count of completed turns its site reported.

    A recording made before sites reported it has only the round, which is the same number
    only where the site took part in, and completed, every round before it. A site cannot have
    completed more turns than there were rounds: a larger count is refused, not replayed.
    """
    turn = int(entry.get("site_turn", entry["round"]))
    if not 1 <= turn <= int(entry["round"]):
        raise NotAuditable(f"{entry['file']}: the site reported turn {turn} in round {entry['round']} (a site completes at most one turn a round)")
    return turn


def poisson_row_indices(cfg, entry: dict, num_rows: int, steps: int) -> list[torch.Tensor]:
    """Evaluator only: the non-empty Poisson batches of a DP-SGD turn (an empty one sends no frame).

    A site draws them from the OS CSPRNG unless its operator gave it an audit sampling seed
    (``graftfl.clients.split_defences``); the evaluator needs the same seed in its environment.
    The turn is the one the site reported (:func:`site_turn`).
    """
    seed = audit_sampling_seed({})  # the evaluator's environment (a value that is not a whole number: a clear error)
    if seed is None:
        raise NotAuditable(f"privacy=dpsgd: unless its sites were given an audit sampling seed (node config {AUDIT_SAMPLING_NODE_CONFIG} "
                           f"or {AUDIT_SAMPLING_ENV}), they drew their Poisson batches from the OS CSPRNG and which records a recorded "
                           f"frame holds cannot be re-derived; if they were, set {AUDIT_SAMPLING_ENV} to the same seed for this command")
    rate = min(1.0, int(cfg.train.batch_size) / max(num_rows, 1))
    generator = audit_sampling_generator(seed, int(entry["partition"]), site_turn(entry))
    batches = [poisson_indices(num_rows, rate, generator) for _ in range(steps)]
    return [indices for indices in batches if len(indices)]


def recorded_rows(cfg, entry: dict, tensors: dict, kind: str = "train") -> tuple[torch.Tensor, torch.Tensor]:
    """Evaluator only: the true inputs and labels behind the recorded frames of one split turn, row for row.

    ``kind`` is the frame kind (``train`` for split/semisup, ``forward``/``backward`` for
    ushaped). Semisup sends only the labeled rows of each batch; those are the rows here.
    Every frame's row count must be that of its replayed batch.
    """
    x, y = site_train_rows(cfg, entry["partition"])
    batches = turn_row_indices(cfg, entry["partition"], site_turn(entry), len(y))
    if cfg.privacy.name == "dpsgd":
        batches = poisson_row_indices(cfg, entry, len(y), len(batches))
    hidden = None
    if cfg.protocol.name == "semisup":  # only labeled rows travel; a batch without any sends no frame at all
        hidden = hidden_label_mask(len(y), cfg.protocol.unlabeled_fraction, int(cfg.seed) * 31 + int(entry["partition"]))
        batches = [indices for indices in batches if (~hidden[indices]).any()]
    positions, recorded = tensors[f"{kind}_batch"].tolist(), tensors[f"{kind}_rows"].tolist()
    rows = [batches[position] if hidden is None else batches[position][~hidden[batches[position]]]
            for position in positions if position < len(batches)]
    if [len(indices) for indices in rows] != recorded:
        why = ("a changed config, or a recording without the site's turn count after a failed or skipped turn" if cfg.privacy.name != "dpsgd" else
               f"a wrong or missing {AUDIT_SAMPLING_ENV}, a changed config")
        raise NotAuditable(f"the {len(recorded)} frames recorded in {entry['file']} ({sum(recorded)} rows) do not match the replayed batches "
                           f"({sum(len(r) for r in rows)} rows): the site's batches could not be re-derived ({why})")
    indices = torch.cat(rows)
    return x[indices], y[indices]
