"""DATA -> its files: a local file or folder, or a Hub dataset read through huggingface_hub's HfFileSystem
(the token, a revision, private repos), with the split (and config) chosen the way `datasets` chooses them."""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import IO, Any, TypeVar

from ..errors import UsageError

FORMATS = {".parquet": "parquet", ".csv": "csv", ".tsv": "csv", ".jsonl": "json", ".ndjson": "json",
           ".json": "json"}
KINDS = "a .parquet, .csv, .tsv, .jsonl or .json file"
_REPO_ID_RE = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
# `datasets`' split names and the words in file or folder names that mean them, bounded by these characters.
_SPLIT_WORDS = {"train": ("train", "training"), "validation": ("validation", "valid", "dev", "val"),
                "test": ("test", "testing", "eval", "evaluation")}
_SEP = r"[-._ 0-9/]"
T = TypeVar("T")


@dataclass(frozen=True)
class DataFile:
    path: str  # what Dataset.open takes: a local path, or a path in HfFileSystem ("datasets/owner/name/...")
    rel: str  # relative to the dataset (for messages)
    format: str  # parquet | csv | json

    @property
    def delimiter(self) -> str:
        return "\t" if self.path.endswith(".tsv") else ","


@dataclass
class Dataset:
    """A dataset's files in row order, and how to open them."""

    label: str  # DATA as the user gave it
    files: list[DataFile]
    split: str | None = None
    config: str | None = None
    repo_id: str | None = None
    revision: str | None = None
    fs: Any = field(default=None, repr=False)  # a HfFileSystem for Hub files

    @property
    def format(self) -> str:
        return self.files[0].format

    def is_local_file(self, path: str) -> bool:
        """Is `path` one of this dataset's local files (so writing it would destroy the data)?"""
        if self.fs is not None:
            return False
        real = os.path.realpath(path)
        return any(os.path.realpath(f.path) == real for f in self.files)

    @property
    def name(self) -> str:
        """A short name for derived files: the repo's name, or the file or folder's stem."""
        if self.repo_id:
            base = self.repo_id.rsplit("/", 1)[1]
        else:
            base = os.path.basename(os.path.normpath(self.label))
            base = os.path.splitext(base)[0] if os.path.isfile(self.label) else base
        return base + (f"-{self.split}" if self.split and self.repo_id else "")

    def open(self, f: DataFile, *, stream: bool = False) -> IO[bytes]:
        """A binary file: local, or over HTTP (`stream`: one sequential GET, for CSV and JSON; else ranged reads
        for Parquet's footer and row groups)."""
        if self.fs is None:
            return open(f.path, "rb")
        fs = self.fs
        return hub_call(lambda: fs.open(f.path, "rb", revision=self.revision, block_size=0 if stream else None),
                        self.label)


def resolve(spec: str, *, split: str | None = None, config: str | None = None, revision: str | None = None,
            token: str | None = None) -> Dataset:
    """DATA as typed -> a Dataset with at least one file, or UsageError saying what was expected."""
    if spec.startswith("hf://"):
        return _hub(spec[len("hf://"):].strip("/"), spec, split, config, revision, token)
    if revision is not None:
        if os.path.exists(spec) or not _REPO_ID_RE.match(spec):
            raise UsageError("--revision applies to a Hub dataset (hf://datasets/OWNER/NAME or OWNER/NAME)")
    if os.path.isfile(spec):
        if split is not None or config is not None:
            raise UsageError(f"--split and --config choose files of a folder or a Hub dataset; {spec} is one file")
        fmt = _format(spec)
        if fmt is None:
            raise UsageError(f"{spec}: not a dataset file; give {KINDS} (or a folder of them)")
        return Dataset(spec, [DataFile(spec, os.path.basename(spec), fmt)])
    if os.path.isdir(spec):
        rels = sorted(_walk(spec))
        readme = os.path.join(spec, "README.md")
        card = _read_text(readme) if os.path.isfile(readme) else None
        chosen, split, config = choose(rels, split, config, card, spec)
        return Dataset(spec, [DataFile(os.path.join(spec, r), r, fmt) for r, fmt in chosen], split, config)
    if _format(spec) is not None:  # data/train.parquet: a local file that is not there, not a repo id
        raise UsageError(f"DATA {spec}: no such file")
    if _REPO_ID_RE.match(spec) and not spec.startswith(("./", "../")):
        return _hub(f"datasets/{spec}", spec, split, config, revision, token)
    raise UsageError(f"DATA {spec!r} not found: give {KINDS}, a folder of them, hf://datasets/OWNER/NAME[/PATH] "
                     "or OWNER/NAME (a Hub dataset)")


def _format(path: str) -> str | None:
    return FORMATS.get(os.path.splitext(path)[1].lower())


def _walk(root: str) -> Iterator[str]:
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not d.startswith((".", "__")))
        for name in files:
            if not name.startswith("."):
                yield os.path.relpath(os.path.join(folder, name), root).replace(os.sep, "/")


def _read_text(path: str) -> str:
    with open(path, encoding="utf-8", errors="replace") as f:
        return f.read()


# ------------------------------------------------------------------ the Hub


def hub_call(fn: Callable[[], T], label: str) -> T:
    """Run a huggingface_hub call; what it raises for a missing repo, a refused token or an unreachable Hub
    becomes one line (exit 2)."""
    from huggingface_hub import constants
    from huggingface_hub.errors import HfHubHTTPError

    try:
        return fn()
    except FileNotFoundError as e:
        raise UsageError(f"{label}: not found on the Hub ({constants.ENDPOINT}): check the name and --revision; a "
                         f"private or gated dataset needs a token that can read it (HF_TOKEN, --token or "
                         f"`hf auth login`) [{_first_line(e)}]") from None
    except HfHubHTTPError as e:
        status = e.response.status_code if e.response is not None else "?"
        hint = " (check your token: HF_TOKEN, --token or `hf auth login`)" if status in (401, 403) else ""
        raise UsageError(f"{label}: the Hub answered {status}{hint}: {_first_line(e)}") from None
    except Exception as e:
        # huggingface_hub's HTTP client (httpx2) raises its own transport errors: the Hub is unreachable.
        if type(e).__module__.split(".")[0] in ("httpx", "httpx2", "httpcore") or isinstance(e, ConnectionError):
            raise UsageError(f"{label}: could not reach the Hub at {constants.ENDPOINT}: {_first_line(e)}") from None
        raise


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def _hub(path: str, label: str, split: str | None, config: str | None, revision: str | None,
         token: str | None) -> Dataset:
    from huggingface_hub import HfFileSystem

    if not path.startswith("datasets/"):
        raise UsageError(f"{label}: hf:// paths name a dataset here: hf://datasets/OWNER/NAME[/PATH]")
    fs = HfFileSystem(token=token)
    from huggingface_hub.hf_file_system import HfFileSystemResolvedRepositoryPath

    resolved = hub_call(lambda: fs.resolve_path(path, revision=revision), label)
    if not isinstance(resolved, HfFileSystemResolvedRepositoryPath):
        raise UsageError(f"{label}: not a dataset repository")
    repo_id, inner = resolved.repo_id, resolved.path_in_repo
    revision = revision or (None if resolved.revision in (None, "main") else resolved.revision)
    root = f"datasets/{repo_id}"
    info = hub_call(lambda: fs.info(path, revision=revision), label)
    if info["type"] == "file":
        if split is not None or config is not None:
            raise UsageError(f"--split and --config choose files of a dataset; {label} is one file")
        fmt = _format(inner)
        if fmt is None:
            raise UsageError(f"{label}: not a dataset file; give {KINDS}")
        return Dataset(label, [DataFile(f"{root}/{inner}", inner, fmt)], None, None, repo_id, revision, fs)
    found = hub_call(lambda: fs.find(path, revision=revision, detail=True), label)
    assert isinstance(found, dict)
    prefix = (inner.strip("/") + "/") if inner else ""
    rels = sorted(_repo_rel(name)[len(prefix):] for name, entry in found.items()
                  if entry.get("type") == "file")
    card = None
    if not inner and "README.md" in rels:
        card = hub_call(lambda: fs.cat_file(f"{root}/README.md", revision=revision), label).decode("utf-8", "replace")
    chosen, split, config = choose(rels, split, config, card, label)
    files = [DataFile(f"{root}/{prefix}{r}", f"{prefix}{r}", fmt) for r, fmt in chosen]
    return Dataset(label, files, split, config, repo_id, revision, fs)


def _repo_rel(name: str) -> str:
    """A HfFileSystem name ("datasets/owner/name[@rev]/a/b") -> its path in the repo ("a/b")."""
    parts = name.split("/", 3)
    return parts[3] if len(parts) == 4 else ""


# ------------------------------------------------------------------ splits and configs


def choose(rels: list[str], split: str | None, config: str | None, card: str | None,
           label: str) -> tuple[list[tuple[str, str]], str | None, str | None]:
    """The data files (path, format) of the split asked for, in order; and the split and config chosen.

    The dataset card's `configs` (data_files per split) when it has them; else `datasets`' conventions: a split
    is named by a file's name or a folder (train/training, validation/valid/dev/val, test/testing/eval/...);
    files that name none are all "train"."""
    data = [(r, fmt) for r in rels if (fmt := _format(r)) is not None and r != "README.md"]
    if not data:
        raise UsageError(f"{label}: no data files ({KINDS}) found")
    patterns = _card_patterns(card, config, label) if card is not None else None
    if patterns is None and config is not None:
        raise UsageError(f"{label}: --config {config}: this dataset's card declares no configs")
    if patterns is not None:
        config, by_split = patterns
        splits = list(by_split)
        split = split or _default_split(splits, label)
        if split not in by_split:
            raise UsageError(f"{label}: no split {split!r}; its splits: {', '.join(splits)}")
        regexes = [_glob_regex(p) for p in by_split[split]]
        chosen = [(r, fmt) for r, fmt in data if any(rx.match(r) for rx in regexes)]
        if not chosen:
            raise UsageError(f"{label}: the card's data_files for split {split!r} ({', '.join(by_split[split])}) "
                             "match no data file")
    else:
        named = {r: _split_of(r, split) for r, _ in data}
        splits = sorted({s for s in named.values() if s}, key=_split_order)
        if not splits:
            if split not in (None, "train"):
                raise UsageError(f"{label}: no split {split!r}; its files name no split, so they are all 'train'")
            chosen, split = data, split
        else:
            split = split or _default_split(splits, label)
            chosen = [(r, fmt) for r, fmt in data if named[r] == split]
            if not chosen:
                raise UsageError(f"{label}: no split {split!r}; its splits: {', '.join(splits)}")
    formats = sorted({fmt for _, fmt in chosen})
    if len(formats) > 1:
        listing = ", ".join(r for r, _ in chosen[:6]) + (" ..." if len(chosen) > 6 else "")
        raise UsageError(f"{label}: these files mix formats ({', '.join(formats)}): {listing}; give one file or "
                         "folder (hf://datasets/OWNER/NAME/PATH)")
    return chosen, split, config


def _default_split(splits: list[str], label: str) -> str:
    if "train" in splits:
        return "train"
    if len(splits) == 1:
        return splits[0]
    raise UsageError(f"{label}: it has the splits {', '.join(splits)}: choose one with --split")


def _split_order(name: str) -> tuple[int, str]:
    order = list(_SPLIT_WORDS)
    return (order.index(name) if name in order else len(order), name)


def _split_of(rel: str, asked: str | None) -> str | None:
    """The split a file's name (first) or its nearest folder names, or None."""
    words = dict(_SPLIT_WORDS)
    if asked and asked not in words:
        words[asked] = (asked,)
    parts = rel.lower().split("/")
    parts[-1] = os.path.splitext(parts[-1])[0]
    for part in reversed(parts):
        for split, names in words.items():
            if any(re.search(rf"(^|{_SEP}){re.escape(w)}({_SEP}|$)", part) for w in names):
                return split
    return None


def _card_patterns(card: str, config: str | None, label: str) -> tuple[str, dict[str, list[str]]] | None:
    """(config name, {split: glob patterns}) from a dataset card's YAML `configs`, or None when it has none."""
    import yaml  # a dependency of huggingface_hub

    if not card.startswith("---"):
        return None
    try:
        meta = yaml.safe_load(card.split("---", 2)[1])
    except (yaml.YAMLError, IndexError):
        return None
    configs = meta.get("configs") if isinstance(meta, dict) else None
    if not isinstance(configs, list) or not configs:
        return None
    named = {str(c.get("config_name", "default")): c for c in configs if isinstance(c, dict)}
    if config is not None:
        if config not in named:
            raise UsageError(f"{label}: no config {config!r}; its configs: {', '.join(named)}")
        chosen = named[config]
    else:
        defaults = [c for c in named.values() if c.get("default")]
        if defaults:
            chosen = defaults[0]
        elif "default" in named or len(named) == 1:
            chosen = named.get("default") or next(iter(named.values()))
        else:
            raise UsageError(f"{label}: it has the configs {', '.join(named)}: choose one with --config")
    name = str(chosen.get("config_name", "default"))
    data_dir = str(chosen.get("data_dir") or "").strip("/")
    files = chosen.get("data_files")
    by_split: dict[str, list[str]] = {}
    if files is None:
        by_split = {"train": [f"{data_dir}/**" if data_dir else "**"]}
    elif isinstance(files, str | list) and all(isinstance(f, str) for f in ([files] if isinstance(files, str)
                                                                             else files)):
        by_split = {"train": [files] if isinstance(files, str) else list(files)}
    elif isinstance(files, list):
        for item in files:
            if isinstance(item, dict) and "split" in item:
                paths = item.get("path", [])
                by_split.setdefault(str(item["split"]), []).extend([paths] if isinstance(paths, str) else paths)
    elif isinstance(files, dict):
        for s, paths in files.items():
            by_split[str(s)] = [paths] if isinstance(paths, str) else list(paths)
    if not by_split:
        return None
    if data_dir and files is not None:
        by_split = {s: [f"{data_dir}/{p}" for p in ps] for s, ps in by_split.items()}
    return name, by_split


def _glob_regex(pattern: str) -> re.Pattern[str]:
    """fsspec's glob on repo paths: `*` and `?` stay within a folder, `**` crosses them."""
    out, i = [], 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out.append("(?:.*/)?")
            i += 3
        elif pattern.startswith("**", i):
            out.append(".*")
            i += 2
        elif pattern[i] == "*":
            out.append("[^/]*")
            i += 1
        elif pattern[i] == "?":
            out.append("[^/]")
            i += 1
        else:
            out.append(re.escape(pattern[i]))
            i += 1
    return re.compile("".join(out).lstrip("/") + r"\Z")


@contextlib.contextmanager
def opened(ds: Dataset, f: DataFile, *, stream: bool = False) -> Iterator[IO[bytes]]:
    fh = ds.open(f, stream=stream)
    try:
        yield fh
    finally:
        fh.close()
