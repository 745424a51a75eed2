"""A dataset named by ``data.hub``: the data files of one split of a Hugging Face Hub dataset repository.

The files are kept in the Hugging Face cache (``datasets--owner--name``, where the ``datasets`` library keeps
its downloads too), fetched through ``huggingface_hub`` when they are not there and the machine is online.
They are read as JSON Lines (``.jsonl``, ``.json``; a ``.json`` file may hold one array) or Parquet.

Which files form the split follows the Hub's conventions: the ``configs`` of the dataset card's YAML header
(``data.subset`` picks one; otherwise the default), else the split's name as a word of a file's path
(``train``/``training``, ``validation``/``valid``/``val``/``dev``, ``test``/``testing``/``eval``), else every
data file is the train split.

Once a split is downloaded, fitune writes the list of its files to its own cache, so a later run finds the
whole split (never a part cut short) in the cache without a request.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from fitune.errors import DataError
from fitune.models import hub

READABLE = (".jsonl", ".json", ".parquet")  # JSON Lines (or one JSON array), Parquet
DATA_EXTENSIONS = (*READABLE, ".csv", ".tsv", ".arrow", ".txt", ".jsonl.gz", ".json.gz")
SPLIT_WORDS = {
    "train": ("train", "training"),
    "validation": ("validation", "valid", "val", "dev"),
    "test": ("test", "testing", "eval", "evaluation"),
}


@dataclass(frozen=True)
class HubSplit:
    repo_id: str
    revision: str | None
    commit: str
    subset: str | None
    split: str
    files: tuple[Path, ...]

    @property
    def label(self) -> str:
        return f"{self.repo_id} ({f'{self.subset}/' if self.subset else ''}{self.split})"

    def record(self) -> dict:
        """What fitune-run.json keeps of it."""
        return {
            "hub_id": self.repo_id,
            "revision": self.revision,
            "commit": self.commit,
            "subset": self.subset,
            "split": self.split,
        }


def _glob(pattern: str) -> re.Pattern:
    """A data_files pattern as a regex over repository paths: ``*`` and ``?`` within one folder, ``**`` across."""
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
    return re.compile("".join(out))


def _card_configs(readme: str | None) -> list[dict]:
    """The ``configs`` list of a dataset card's YAML header ([] when it has none or cannot be read)."""
    import yaml

    if not readme or not readme.startswith("---"):
        return []
    header = readme[3:].split("\n---", 1)[0]
    try:
        meta = yaml.safe_load(header)
    except yaml.YAMLError:
        return []
    configs = meta.get("configs") if isinstance(meta, dict) else None
    return [c for c in configs if isinstance(c, dict)] if isinstance(configs, list) else []


def _as_list(value) -> list[str]:
    return [value] if isinstance(value, str) else [v for v in value or [] if isinstance(v, str)]


def _config_splits(config: dict) -> dict[str, list[str]]:
    """A card config's ``data_files`` as split -> patterns (a bare pattern or list is the train split)."""
    files = config.get("data_files")
    if files is None:
        return {}
    if isinstance(files, str) or (isinstance(files, list) and all(isinstance(f, str) for f in files)):
        return {"train": _as_list(files)}
    if isinstance(files, dict):
        return {str(k): _as_list(v) for k, v in files.items()}
    splits: dict[str, list[str]] = {}
    for entry in files:
        if isinstance(entry, dict) and "split" in entry:
            splits.setdefault(str(entry["split"]), []).extend(_as_list(entry.get("path")))
    return splits


METADATA = ("dataset_info.json", "dataset_infos.json", "dataset_dict.json", "state.json")  # not examples


def _is_data(path: str) -> bool:
    parts = path.split("/")
    return (
        path.lower().endswith(DATA_EXTENSIONS)
        and parts[-1] not in METADATA
        and not any(part.startswith((".", "_")) for part in parts)
    )


def _names(text: str, words: tuple[str, ...]) -> bool:
    """Whether one of ``words`` is a word of ``text`` (words run between anything that is not a letter)."""
    return not set(re.split(r"[^a-z]+", text.lower())).isdisjoint(words)


def _split_by_name(paths: list[str], split: str) -> tuple[list[str], list[str]]:
    """The data files among ``paths`` whose path names ``split`` (every one when none names a split), and the
    splits that are there."""
    data = [p for p in paths if _is_data(p)]
    by_split = {name: sorted(p for p in data if _names(p, words)) for name, words in SPLIT_WORDS.items()}
    if not any(by_split.values()):
        by_split = {"train": sorted(data)}  # no split named anywhere: every data file is training data
    by_split = {name: files for name, files in by_split.items() if files}
    return by_split.get(split, []), sorted(by_split)


def split_files(
    repo_id: str, paths: list[str], readme: str | None, subset: str | None, split: str
) -> list[str]:
    """The repository paths that hold ``split`` of ``subset``, sorted; raises DataError naming what exists."""
    configs = _card_configs(readme)
    if configs:
        names = [str(c.get("config_name", "default")) for c in configs]
        if subset is None:
            flagged = [c for c in configs if c.get("default")]
            chosen = (
                flagged[0] if flagged else configs[names.index("default")] if "default" in names else None
            )
            if chosen is None and len(configs) == 1:
                chosen = configs[0]
            if chosen is None:
                raise DataError(
                    f"data.subset: {repo_id} has several subsets and none is the default ({', '.join(names)}); "
                    "fix: set data.subset to one of them"
                )
        elif subset in names:
            chosen = configs[names.index(subset)]
        else:
            raise DataError(
                f"data.subset: {subset!r} is not a subset of {repo_id} (its dataset card lists "
                f"{', '.join(names)}); fix: set data.subset to one of them"
            )
        where = f"subset {chosen.get('config_name', 'default')!r} of {repo_id}"
        splits = _config_splits(chosen)
        if splits:
            patterns = splits.get(split)
            matched = sorted(p for p in paths if patterns and any(_glob(g).fullmatch(p) for g in patterns))
            available = sorted(splits)
        else:  # data_dir (or nothing): the split names within that folder
            folder = str(chosen.get("data_dir") or "").strip("/")
            inside = [p for p in paths if not folder or p.startswith(folder + "/")]
            matched, available = _split_by_name(inside, split)
    else:
        if subset is not None:
            raise DataError(
                f"data.subset: {repo_id} has no subsets (its dataset card defines no configs), so "
                f"{subset!r} names none; fix: remove data.subset"
            )
        where = repo_id
        matched, available = _split_by_name(paths, split)
    if not matched:
        if not available:
            raise DataError(
                f"data.hub: {where} holds no data files ({', '.join(e for e in READABLE)} or others the Hub "
                "knows); fix: check the id, or point data.path at a local file"
            )
        words = SPLIT_WORDS.get(split, (split,))
        named = [name for name in available if _names(name, words)]
        if len(named) == 1:  # train_sft for train: the one split named for it
            raise DataError(
                f"data.split: {split!r} is not a split of {where} (it has {', '.join(available)}); fix: set "
                f"data.split: {named[0]} (the one named for {split}), or another of them",
                change={"data.split": named[0]},
            )
        raise DataError(
            f"data.split: {split!r} is not a split of {where} (it has {', '.join(available)}); fix: set "
            "data.split to one of them"
        )
    unreadable = [p for p in matched if not p.lower().endswith(READABLE)]
    if unreadable:
        raise DataError(
            f"data.hub: the {split} split of {where} is in files fitune does not read yet "
            f"({', '.join(unreadable[:3])}{' ...' if len(unreadable) > 3 else ''}); fix: convert it to JSONL "
            "(one example per line) or Parquet and point data.path at that file"
        )
    return matched


def _manifest(repo_id: str, commit: str, subset: str | None, split: str) -> Path:
    from fitune.models.sources import cache_dir as fitune_cache

    name = f"{subset or '_default'}--{split}.json"
    return fitune_cache() / "hub-datasets" / repo_id.replace("/", "--") / commit / name


def _cached(repo_id: str, commit: str, subset: str | None, split: str) -> tuple[Path, ...] | None:
    """The split's files at ``commit`` when every one of them is in the cache, else None (no request)."""
    manifest = _manifest(repo_id, commit, subset, split)
    try:
        names = json.loads(manifest.read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    snapshot = hub.DATASET.folder(repo_id) / "snapshots" / commit
    files = tuple(snapshot / name for name in names)
    return files if files and all(f.is_file() for f in files) else None


def resolve_split(
    repo_id: str,
    revision: str | None = None,
    subset: str | None = None,
    split: str = "train",
    *,
    show_progress: bool = True,
) -> HubSplit:
    """``split`` of ``repo_id`` at ``revision``: from the cache when the whole split is there (no request),
    else downloaded into it. Raises ModelSourceError (offline, unreachable, gated, unknown) or DataError
    (no such subset or split, files fitune cannot read) with the fix."""
    commit = hub.cached_commit(repo_id, revision, hub.DATASET)
    files = _cached(repo_id, commit, subset, split) if commit else None
    if files is not None:
        return HubSplit(repo_id, revision, commit, subset, split, files)
    hub.go_online(repo_id, f"the {split} split", hub.DATASET)
    commit, entries = hub.repo_files(repo_id, revision, hub.DATASET)
    by_path = {e.path: e for e in entries}
    readme = None
    if "README.md" in by_path:
        (card,) = hub.download_files(
            repo_id, revision, commit, [by_path["README.md"]], hub.DATASET, show_progress=False
        )
        readme = card.read_text(encoding="utf-8", errors="replace")
    chosen = split_files(repo_id, sorted(by_path), readme, subset, split)
    paths = hub.download_files(
        repo_id, revision, commit, [by_path[p] for p in chosen], hub.DATASET, show_progress=show_progress
    )
    manifest = _manifest(repo_id, commit, subset, split)
    manifest.parent.mkdir(parents=True, exist_ok=True)
    tmp = manifest.with_suffix(".tmp")
    tmp.write_text(json.dumps({"files": chosen}))
    tmp.replace(manifest)
    return HubSplit(repo_id, revision, commit, subset, split, tuple(paths))
