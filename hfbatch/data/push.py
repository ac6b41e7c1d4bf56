"""Push: a merge's result -> a Hub dataset repo (huggingface_hub's HfApi), with a short dataset card saying which
data, model(s) and batch produced it. One commit: the data file and the card."""

from __future__ import annotations

import os
from typing import Any

from .. import __version__
from ..errors import UsageError
from .merge import MergeReport
from .source import hub_call

MARKER = "<!-- written by hfbatch merge: edit freely, hfbatch then leaves this card alone -->"


def find_batch(output_path: str) -> dict[str, Any] | None:
    """The newest batch in the registry that wrote `output_path` (its Batch object), if any."""
    from ..batches.registry import Registry

    want = os.path.realpath(output_path)
    found: list[tuple[int, dict[str, Any]]] = []
    try:
        for b in Registry().all():
            try:
                meta = b.meta()
                path = meta.get("output_path")
                if isinstance(path, str) and path != "-" and os.path.realpath(path) == want:
                    found.append((int(meta.get("created_ns") or 0), b.batch()))
            except (OSError, ValueError, KeyError, UsageError):
                continue
    except (OSError, UsageError):
        return None
    return max(found, key=lambda f: f[0])[1] if found else None


def data_path(split: str, result: str) -> str:
    return f"data/{split}-00000-of-00001{os.path.splitext(result)[1]}"


def push(result: str, repo_id: str, *, split: str, report: MergeReport, batch: dict[str, Any] | None,
         private: bool = False, token: str | None = None) -> str:
    """Upload `result` (and the card, unless the repo's own card was written by someone else); the repo's URL."""
    from huggingface_hub import CommitOperationAdd, HfApi, HfFileSystem, constants

    api = HfApi(token=token)
    exists = hub_call(lambda: api.repo_exists(repo_id, repo_type="dataset"), repo_id)
    if exists and private:
        info = hub_call(lambda: api.repo_info(repo_id, repo_type="dataset"), repo_id)
        if not info.private:
            raise UsageError(f"{repo_id} exists and is public: --private does not change an existing repo; make it "
                             "private on the Hub first, or push to another name")
    if not exists:
        hub_call(lambda: api.create_repo(repo_id, repo_type="dataset", private=private, exist_ok=True), repo_id)
    in_repo = data_path(split, result)
    old = None
    if exists and hub_call(lambda: api.file_exists(repo_id, "README.md", repo_type="dataset"), repo_id):
        fs = HfFileSystem(token=token, endpoint=api.endpoint)  # read, not downloaded into the user's cache
        old = hub_call(lambda: fs.cat_file(f"datasets/{repo_id}/README.md"), repo_id).decode("utf-8", "replace")
    ops = [CommitOperationAdd(in_repo, result)]
    if old is None or MARKER in old:
        card = dataset_card(repo_id, split=split, in_repo=in_repo, report=report, batch=batch, old=old)
        ops.append(CommitOperationAdd("README.md", card.encode()))
    hub_call(lambda: api.create_commit(repo_id, repo_type="dataset", operations=ops,
                                       commit_message=f"hfbatch merge: {report['rows']:,} rows ({split})"), repo_id)
    return f"{constants.ENDPOINT.rstrip('/')}/datasets/{repo_id}"


def dataset_card(repo_id: str, *, split: str, in_repo: str, report: MergeReport, batch: dict[str, Any] | None,
                 old: str | None = None) -> str:
    """YAML front matter (one config; this split's file added to the splits an earlier push declared) and a few
    lines: the data, the model(s), the batch, the counts."""
    import yaml

    splits: dict[str, str] = {}
    if old is not None and old.startswith("---"):
        try:
            meta = yaml.safe_load(old.split("---", 2)[1]) or {}
            for item in meta.get("configs", [{}])[0].get("data_files", []):
                splits[str(item["split"])] = str(item["path"])
        except (yaml.YAMLError, IndexError, KeyError, TypeError, AttributeError):
            splits = {}
    splits[split] = in_repo
    front = yaml.safe_dump({
        "configs": [{"config_name": "default",
                     "data_files": [{"split": s, "path": p} for s, p in sorted(splits.items())]}],
        "tags": ["hfbatch", "synthetic"],
    }, sort_keys=False)
    models = report["models"] or ([batch["model"]] if batch and batch.get("model") else [])
    lines = [
        "---", front.rstrip(), "---", "", MARKER, "", f"# {repo_id.split('/')[-1]}", "",
        f"The rows of `{report['data']}`" + (f" (split `{report['split']}`)" if report["split"] else "")
        + f" with the answers of {_list(models) or 'a model'}, produced with "
        f"hfbatch {__version__} (`hfbatch prepare`, `submit`, `merge`).", "",
        "| | |", "|---|---|",
        f"| data | `{report['data']}` |",
        f"| model{'s' if len(models) > 1 else ''} | {_list(models) or 'unknown'} |",
    ]
    if batch:
        rc = batch.get("request_counts") or {}
        lines.append(f"| batch | `{batch.get('id')}`: {batch.get('status')}, {rc.get('total', 0):,} requests "
                     f"({rc.get('completed', 0):,} completed, {rc.get('failed', 0):,} failed), endpoint "
                     f"`{batch.get('endpoint')}` |")
        usage = batch.get("usage") or {}
        if usage:
            lines.append(f"| tokens | {usage.get('input_tokens', 0):,} in, {usage.get('output_tokens', 0):,} out |")
    lines += [
        f"| rows | {report['rows']:,}: {report['answered']:,} answered, {report['failed']:,} failed, "
        f"{report['missing']:,} without an answer (`error` says why) |",
        f"| columns added | {', '.join(f'`{c}`' for c in report['columns'])} |",
        "",
    ]
    return "\n".join(lines)


def _list(models: list[str]) -> str:
    return ", ".join(f"`{m}`" for m in models)
