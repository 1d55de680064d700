"""Peers timed on the same token ids: HF transformers greedy decoding and the `dflash` loop.

    peers = load_peers(["hf", "dflash"], model_path, head_dir, notes)   # those that can run
    run = peers["hf"].run(ids, max_new_tokens, stop_ids)                # PeerRun

Both run the target as HF transformers loads it (torch, CPU, float32): from a `.gguf` file via
`from_pretrained(dir, gguf_file=...)`, or from an HF directory. The `dflash` peer is the package's
own reference loop (`dflash.model.dflash_generate`: a linear block of the head's block size, i.e.
our "chain"), with our head loaded by `DFlashDraftModel.from_pretrained(head_dir)`.
Rounds are counted with a forward hook on the target: tau = tokens per target forward after the
prefill. Both peers' prefill already yields the first token, so their tau is (new - 1) / rounds
(ours: the prefill yields none, every new token comes from a round).
"""

from __future__ import annotations

import dataclasses
import time
import warnings
from pathlib import Path

PEERS = ("hf", "dflash")
# What "this peer cannot run here" looks like: a missing package, an unreadable file, an
# architecture or format transformers does not support.
_UNAVAILABLE = (ImportError, OSError, ValueError, RuntimeError, KeyError)


@dataclasses.dataclass
class PeerRun:
    ids: list  # new token ids (stop id included when it stopped on one)
    seconds: float  # prefill included
    rounds: int  # target forwards after the prefill


class _ForwardCounter:
    def __init__(self, module):
        self.n = 0
        module.register_forward_hook(self._hook)

    def _hook(self, *_):
        self.n += 1


def _trim(ids, stop_ids):
    """Cut after the first stop id, as our loop does."""
    for i, t in enumerate(ids):
        if t in stop_ids:
            return ids[: i + 1]
    return ids


class HFPeer:
    name = "hf"

    def __init__(self, target):
        self.target = target
        self.calls = _ForwardCounter(target)
        self._warm = False

    def _generate(self, ids, max_new, stop_ids):
        import torch

        x = torch.tensor([ids])
        with torch.no_grad():
            out = self.target.generate(
                x, attention_mask=torch.ones_like(x), max_new_tokens=max_new, do_sample=False,
                eos_token_id=list(stop_ids) or None, pad_token_id=(list(stop_ids) or [0])[0],
                temperature=None, top_p=None, top_k=None)
        return out[0, len(ids):].tolist()

    def run(self, ids, max_new, stop_ids) -> PeerRun:
        if not self._warm:
            self._generate(ids, 4, stop_ids)
            self._warm = True
        before = self.calls.n
        t0 = time.perf_counter()
        new = self._generate(ids, max_new, stop_ids)
        seconds = time.perf_counter() - t0
        return PeerRun(_trim(new, stop_ids), seconds, self.calls.n - before - 1)


class DFlashPeer:
    name = "dflash"

    def __init__(self, target, head_dir):
        import torch
        from dflash.model import DFlashDraftModel

        self.target = target
        self.draft = DFlashDraftModel.from_pretrained(head_dir, dtype=torch.float32).eval()
        self.calls = _ForwardCounter(target)
        self._warm = False

    def _generate(self, ids, max_new, stop_ids):
        import torch
        from dflash.model import dflash_generate

        with warnings.catch_warnings():  # dflash 0.1.0 passes `past_key_values`, which
            warnings.simplefilter("ignore", FutureWarning)  # transformers 5 deprecates
            out = dflash_generate(self.draft, self.target, torch.tensor([ids]), max_new,
                                  list(stop_ids) or None)
        return out[0, len(ids):].tolist()

    def run(self, ids, max_new, stop_ids) -> PeerRun:
        if not self._warm:
            self._generate(ids, 4, stop_ids)
            self._warm = True
        before = self.calls.n
        t0 = time.perf_counter()
        new = self._generate(ids, max_new, stop_ids)
        seconds = time.perf_counter() - t0
        return PeerRun(_trim(new, stop_ids), seconds, self.calls.n - before - 1)


def load_hf_target(model_path: Path):
    """The target as HF transformers loads it (float32, eval), or raise with the reason."""
    import torch
    import transformers

    if model_path.is_file():
        kwargs = dict(gguf_file=model_path.name)
        model_path = model_path.parent
    elif (model_path / "config.json").is_file():
        kwargs = {}
    else:
        raise RuntimeError(f"{model_path} is not a .gguf file or an HF directory")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = transformers.AutoModelForCausalLM.from_pretrained(
            model_path, dtype=torch.float32, **kwargs)
    return model.eval()


def load_peers(names, model_path: Path, head_dir, notes: list, torch_threads=None) -> dict:
    """{name: peer} for the peers that can run here; why the others cannot goes into `notes`."""
    peers = {}
    if not names:
        return peers
    try:
        if torch_threads is not None:
            import torch

            torch.set_num_threads(torch_threads)
        target = load_hf_target(Path(model_path))
    except _UNAVAILABLE as e:
        notes.append(f"peers {', '.join(names)} skipped: transformers cannot load the target ({e})")
        return peers
    if "hf" in names:
        peers["hf"] = HFPeer(target)
    if "dflash" in names:
        if head_dir is None:
            notes.append("peer dflash skipped: it needs a draft head (--draft)")
        else:
            try:
                peers["dflash"] = DFlashPeer(target, head_dir)
            except _UNAVAILABLE as e:
                notes.append(f"peer dflash skipped: {type(e).__name__}: {e}")
    return peers
