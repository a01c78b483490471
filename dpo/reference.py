"""Precomputed reference log-probs, cached on disk.

The reference model is frozen, so its log-probs of every pair can be computed in one pass before
training, after which the reference model is no longer needed in memory. At step 0 the policy *is*
the reference, so the pass runs on the policy itself before its first update: no second copy of the
model is ever loaded. The cache file name carries a key of everything the numbers depend on (model
weights, the tokenized pairs, precision, scoring settings); a changed key recomputes.
"""

from __future__ import annotations

import hashlib
import json
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch
from huggingface_hub import try_to_load_from_cache
from torch import Tensor

from dpo.data import TokenizedPair, pairs_digest
from dpo.errors import UserError
from dpo.files import write_atomically
from dpo.logprobs import SequenceScorer
from dpo.modeling import adapter_base, is_adapter_dir, resolve_model_path
from dpo.packing import micro_batches


class ReferenceLogpsError(UserError):
    """Reference log-probs that cannot be used (not finite)."""


@dataclass
class ReferenceLogps:
    """The frozen reference's summed log-probs of each pair's chosen and rejected responses."""

    chosen: Tensor  # [num_pairs] summed log-probs, fp32, on CPU; NaN for a pair that was not scored
    rejected: Tensor

    def require_finite(self, where: str) -> "ReferenceLogps":
        """These log-probs, or a one-line error naming `where` (a step, a round) when any is NaN or inf."""
        if not bool(torch.isfinite(torch.cat([self.chosen, self.rejected])).all()):
            raise ReferenceLogpsError(f"{where}: the reference log-probs of some of its pairs are not finite (a "
                                      "reference model that outputs NaN or inf?)")
        return self

    def take(self, indices: Sequence[int], device: torch.device) -> tuple[Tensor, Tensor]:
        """The log-probs of pairs `indices`, on `device`: (chosen, rejected)."""
        index = torch.as_tensor(list(indices), dtype=torch.long)
        return self.chosen[index].to(device), self.rejected[index].to(device)

    def select(self, indices: Sequence[int]) -> "ReferenceLogps":
        """The log-probs of pairs `indices` only, in that order."""
        index = torch.as_tensor(list(indices), dtype=torch.long)
        return ReferenceLogps(self.chosen[index], self.rejected[index])

    def spread(self, indices: Sequence[int], size: int) -> "ReferenceLogps":
        """These log-probs are those of pairs `indices` of a set of `size` pairs: the set's, NaN elsewhere."""
        index = torch.as_tensor(list(indices), dtype=torch.long)
        chosen, rejected = torch.full((size,), float("nan")), torch.full((size,), float("nan"))
        chosen[index], rejected[index] = self.chosen, self.rejected
        return ReferenceLogps(chosen, rejected)


IDENTITY_FILES = ("config.json", "adapter_config.json")  # and every weight file (WEIGHT_SUFFIXES)
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt")


def model_fingerprint(model_path: str) -> dict:
    """Identity of a model or adapter: a directory's weight files and configs, each by its size, modification time
    and a hash of its first and last MiB (a file written again has another time); a hub name by the commit of its
    local snapshot (the hub's model may change under its name), or by its name where none is cached."""
    path = Path(model_path)
    if not path.is_dir():
        snapshot = hub_snapshot(model_path)
        return {"hub": model_path} if snapshot is None else {"hub": model_path, "revision": snapshot.name}
    files = {}
    for file in sorted(path.iterdir()):
        if file.suffix in WEIGHT_SUFFIXES or file.name in IDENTITY_FILES:
            digest = hashlib.sha256()
            stat = file.stat()
            with open(file, "rb") as handle:
                digest.update(handle.read(1 << 20))
                if stat.st_size > (2 << 20):
                    handle.seek(stat.st_size - (1 << 20))
                    digest.update(handle.read())
            files[file.name] = [stat.st_size, stat.st_mtime_ns, digest.hexdigest()]
    return files


def hub_snapshot(name: str) -> Path | None:
    """The local snapshot directory (named by its commit) a hub model's or adapter's files load from, None where none
    is cached."""
    for filename in IDENTITY_FILES:
        try:
            cached = try_to_load_from_cache(name, filename)
        except ValueError:  # not a valid repository id
            return None
        if isinstance(cached, str):
            return Path(cached).parent
    return None


def model_identity(model_path: str, adapter: str | None = None) -> dict:
    """What a reference's numbers follow of its weights: the fingerprints of the model, of the base an adapter
    directory given as the model loads on (its adapter_config.json's), and of the adapter it starts from
    (--adapter)."""
    identity = {"model": model_fingerprint(model_path)}
    if is_adapter_dir(model_path):
        identity["base"] = model_fingerprint(resolve_model_path(adapter_base(model_path)))
    if adapter is not None:
        identity["adapter"] = model_fingerprint(adapter)
    return identity


def content_identity(identity: dict) -> dict:
    """model_identity without modification times: what a copy of the same files (another node, a moved run) keeps."""
    def content(fingerprint: dict) -> dict:
        return {name: value if "hub" in fingerprint else [value[0], value[2]] for name, value in fingerprint.items()}

    return {part: content(fingerprint) for part, fingerprint in identity.items()}


def identity_changes(then: dict, now: dict) -> list[str]:
    """What differs between two content_identity results, in words: the files that changed, appeared or went, a hub
    model's snapshot (where both are known: a model not cached yet has none)."""
    changes = []
    for part in sorted(set(then) | set(now)):
        a, b = then.get(part, {}), now.get(part, {})
        if "hub" in a or "hub" in b:
            if a.get("hub") != b.get("hub"):
                changes.append(f"the {part} {a.get('hub', 'a local directory')} -> {b.get('hub', 'a local directory')}")
            elif None not in (a.get("revision"), b.get("revision")) and a["revision"] != b["revision"]:
                changes.append(f"the {part}'s hub snapshot {a['revision']} -> {b['revision']}")
            continue
        owner = "" if part == "model" else f"the {part}'s "
        changes += [f"{owner}{name} {'changed' if name in a and name in b else 'appeared' if name in b else 'is gone'}"
                    for name in sorted(set(a) | set(b)) if a.get(name) != b.get(name)]
    return changes


def cache_key(identity: dict, pairs: Sequence[TokenizedPair], settings: dict) -> str:
    """The cache file's key: the reference's identity (model_identity), the scoring settings and every tokenized
    pair."""
    digest = hashlib.sha256()
    digest.update(json.dumps({**identity, "settings": settings}, sort_keys=True).encode())
    digest.update(pairs_digest(pairs).encode())
    return digest.hexdigest()[:20]


@torch.no_grad()
def compute_reference_logps(
    scorer: SequenceScorer,
    pairs: Sequence[TokenizedPair],
    *,
    micro_batch_size: int,
    collate: Callable[[list[TokenizedPair]], dict[str, Tensor]],
    device: torch.device,
    autocast: Callable[[], AbstractContextManager],
    max_tokens: int | None = None,
    layout: str = "padded",
) -> ReferenceLogps:
    """The reference's log-probs of every pair, scored by `scorer` in eval mode and without gradient, in
    micro-batches as training cuts them (dpo.packing.micro_batches: of `micro_batch_size` pairs, or within
    `max_tokens` of `collate`'s `layout`), longest first so that similar lengths share a micro-batch."""
    was_training = scorer.training
    scorer.eval()
    chosen = torch.zeros(len(pairs), dtype=torch.float32)
    rejected = torch.zeros(len(pairs), dtype=torch.float32)
    for ids in micro_batches(range(len(pairs)), pairs, micro_batch_size, True, max_tokens, layout):
        batch = {k: v.to(device) for k, v in collate([pairs[i] for i in ids]).items()}
        with autocast():
            logps = scorer(batch)
        sums = logps.sum.float().cpu()
        index = torch.as_tensor(ids)
        chosen[index] = sums[: len(ids)]
        rejected[index] = sums[len(ids) :]
    scorer.train(was_training)
    return ReferenceLogps(chosen=chosen, rejected=rejected)


def load_cached(cache_file: Path, count: int) -> ReferenceLogps | None:
    """Reference log-probs of `count` pairs read back from a cache file (`save_cached`'s), or None where there is
    none, or it cannot be read as one (then the caller computes them again)."""
    try:
        data = torch.load(cache_file, weights_only=True)
        result = ReferenceLogps(chosen=data["chosen"], rejected=data["rejected"])
    except Exception:  # missing, cut short, foreign: torch, zip and pickle raise many types
        return None
    shapes_fit = all(isinstance(t, torch.Tensor) and t.shape == (count,) for t in (result.chosen, result.rejected))
    return result if shapes_fit else None


def save_cached(cache_file: Path, result: ReferenceLogps) -> None:
    """Written whole or not at all (a temporary file, synced to disk, renamed)."""
    write_atomically(cache_file, lambda handle: torch.save({"chosen": result.chosen, "rejected": result.rejected},
                                                           handle))

