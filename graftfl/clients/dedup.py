"""The ``dedup`` pre-training phase, site side: answers ``query.dedup`` with this site's part of the pairwise PSI.

Every message rebuilds a :class:`~graftfl.core.dedup.DedupSite` (in deployment each message
starts a fresh ClientApp process) from

- the site's own rows: :func:`graftfl.core.sitedata.site_data_from_config` on node-config
  ``data-path``, in load order (held-out rows included) -- row *i* here is row *i* of every
  protocol's site loader;
- the salt the sites share: node-config ``dedup-salt`` or ``$GRAFTFL_DEDUP_SALT``, never
  anything the server sends;
- its secret state (EC keys, drops so far), kept in ``context.state[phase_state_key("dedup")]``.

The site's rank is its partition-id, which it reports in its reply to the first step. The
same state record holds ``dropped-rows`` (:data:`graftfl.core.wire.DROPPED_ROWS`): the JSON list
of the row indices to leave out of training and held-out evaluation, ``[]`` until this site
has finished against a lower-ranked site. Nothing in that record is ever sent.
"""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path
from typing import Any

from flwr.app import ConfigRecord, Context, Message, RecordDict

from graftfl.clients.site_data import data_path_of
from graftfl.clients.utils import config_of, partition_id_of
from graftfl.core.dedup import DedupConfig, DedupSite, image_phash, resolve_salt
from graftfl.core.site_formats import MANIFEST_NAME
from graftfl.core.sitedata import DATA_PATH_KEY, SiteData, site_data_from_config
from graftfl.core.wire import DEDUP_RECORD, DROPPED_ROWS
from graftfl.protocols import ClientPhase, phase_state_key

PHASE = "dedup"
STATE_FIELD = "dedup.state"  # DedupSite.secret_state()'s key
RANK_FIELD = "rank"

log = logging.getLogger(__name__)


def manifest_rows(data: SiteData, data_path: Path) -> list[dict[str, str]]:
    """Every column of the site's ``manifest.csv``, one mapping per row in load order (for a composite key)."""
    if data.format != "manifest":
        raise ValueError(f"a dedup key of several columns needs a {MANIFEST_NAME} with them; this site's data is in the {data.format!r} layout")
    with open(data_path / MANIFEST_NAME, newline="", encoding="utf-8-sig") as handle:
        rows = [{(k or "").strip(): (v or "").strip() for k, v in row.items()} for row in csv.DictReader(handle)]
    if len(rows) != len(data):
        raise ValueError(f"{MANIFEST_NAME} has {len(rows)} rows but the site loaded {len(data)}; it changed during the phase")
    return rows


def record_keys_and_hashes(context: Context, cfg, settings: DedupConfig) -> tuple[list[Any], list[int] | None]:
    """This site's identifier key per row (load order) and, with ``images=phash``, one pHash per row."""
    data_path = data_path_of(context)
    data = site_data_from_config({**dict(context.node_config), DATA_PATH_KEY: data_path}, cfg.dataset, f"node {context.node_id}",
                                 site_fraction=float(cfg.eval.site_fraction), seed=int(cfg.seed))
    columns = settings.key_spec().columns
    if columns == ("patient_id",):
        if data.patient_ids is None:
            raise ValueError("dedup key 'patient_id': this site's data has no patient_id column "
                             f"(a {MANIFEST_NAME} with path,label,patient_id[,split])")
        keys: list[Any] = list(data.patient_ids)
    else:
        keys = manifest_rows(data, Path(str(data_path)).expanduser())
    hashes = [image_phash(image.numpy()) for image in data.x] if settings.images == "phash" else None
    return keys, hashes


def query(message: Message, context: Context) -> Message:
    """One step of the phase (``request``, ``serve`` or ``finish``); the reply carries blinded elements or counts only."""
    cfg = config_of(message)
    settings = DedupConfig.from_group(cfg.dedup)
    fields = dict(message.content[DEDUP_RECORD])
    partition_id, _ = partition_id_of(context)
    state_key = phase_state_key(PHASE)
    first = fields.get("step") == "request"
    if first:  # a new phase: this site's rank is its partition-id; earlier state is discarded
        fields[RANK_FIELD] = partition_id
        secret = None
    else:
        if state_key not in context.state or STATE_FIELD not in context.state[state_key]:
            raise ValueError(f"dedup step {fields.get('step')!r} before this site's request step (no phase state)")
        if fields.get(RANK_FIELD) != partition_id:
            raise ValueError(f"dedup step addressed to rank {fields.get(RANK_FIELD)!r}; this site is partition-id {partition_id}")
        secret = {STATE_FIELD: context.state[state_key][STATE_FIELD]}
    keys, hashes = record_keys_and_hashes(context, cfg, settings)
    site = DedupSite(keys, resolve_salt(context.node_config), settings, image_hashes=hashes, secret_state=secret)
    reply = site.handle(fields)
    dropped = site.dropped_records()
    context.state[state_key] = ConfigRecord({**site.secret_state(), DROPPED_ROWS: json.dumps(dropped)})
    if first:
        reply[RANK_FIELD] = partition_id
    else:
        log.info("dedup %s: %d of %d rows to leave out so far", fields.get("step"), len(dropped), len(keys))
    return Message(RecordDict({DEDUP_RECORD: ConfigRecord(reply)}), reply_to=message)


CLIENT_PHASE = ClientPhase(name=PHASE, query=query)
