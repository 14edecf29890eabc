"""Read W&B's offline run files (``wandb/offline-run-*/run-<id>.wandb``) for tests, with W&B's own protobuf types.

The file is W&B's header (``:W&B``, a 2-byte magic, a version byte) followed by LevelDB-log records (32 KiB
blocks; each chunk a 7-byte header: CRC, length, type FULL/FIRST/MIDDLE/LAST) holding serialized ``Record``s.
"""
import glob
import json
import os
import struct
from typing import Dict, List

BLOCK = 32768
FULL, LAST = 1, 4


def records(path: str) -> list:
    from wandb.proto import wandb_internal_pb2 as pb

    with open(path, "rb") as f:
        data = f.read()
    assert data[:4] == b":W&B", f"{path}: not a W&B transaction log"
    pos, out, pending = 7, [], b""
    while pos + 7 <= len(data):
        left = BLOCK - pos % BLOCK
        if left < 7:  # a block's tail too short for a chunk header is padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        pending += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (FULL, LAST) and pending:
            record = pb.Record()
            record.ParseFromString(pending)
            out.append(record)
            pending = b""
    return out


def offline_runs(output_dir: str) -> List[dict]:
    """Each offline session under ``<output_dir>/wandb`` (oldest first): its run id, project, group, name and
    history as ``{step: {key: value}}``."""
    sessions = []
    for folder in sorted(glob.glob(os.path.join(output_dir, "wandb", "offline-run-*"))):
        (log,) = glob.glob(os.path.join(folder, "*.wandb"))
        recs = records(log)
        (run,) = [r.run for r in recs if r.WhichOneof("record_type") == "run"]
        history: Dict[int, dict] = {}
        for r in recs:
            if r.WhichOneof("record_type") == "history":
                history[r.history.step.num] = {"/".join(i.nested_key) or i.key: json.loads(i.value_json)
                                               for i in r.history.item}
        sessions.append({"folder": folder, "id": run.run_id, "project": run.project, "group": run.run_group,
                         "name": run.display_name, "history": history})
    return sessions
