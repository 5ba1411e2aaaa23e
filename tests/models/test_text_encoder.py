"""The frozen umT5 wrapper against a direct run of the encoder the way diffusers' WanPipeline does it (padding to
512, zeroing past the real tokens), on a tiny random UMT5EncoderModel and a locally built Unigram tokenizer."""

import os

import pytest
import torch

transformers = pytest.importorskip("transformers")

from loom.models import text_encoder as te  # noqa: E402
from tests.models.contract import FrozenEncoderContract  # noqa: E402

WORDS = "a 3d object of the red blue chair car cat on turntable video 360-degree rotating".split()


def save_tiny_tokenizer(path) -> str:
    """A umT5-like tokenizer (Unigram, metaspace, </s> appended, <pad> = 0) built offline and saved locally."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    vocab += [("▁" + w, -1.0 - 0.01 * i) for i, w in enumerate(WORDS)]
    vocab += [(ch, -5.0) for ch in "abcdefghijklmnopqrstuvwxyz0123456789-_&;"]
    tok = Tokenizer(models.Unigram(vocab, unk_id=2, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Metaspace(
        replacement="▁", prepend_scheme="always", split=True)])
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    tok.post_processor = processors.TemplateProcessing(single=["$A", "</s>"], special_tokens=[("</s>", 1)])
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", pad_token="<pad>",
                                                unk_token="<unk>")
    fast.save_pretrained(str(path))
    return str(path)


def save_tiny_umt5(path, tokenizer_dir=None, seed: int = 0) -> str:
    """A tiny random UMT5EncoderModel (d_model 32, 2 layers) saved to ``path`` (with its tokenizer there too unless
    ``tokenizer_dir`` is given)."""
    vocab = 4 + len(WORDS) + 40
    cfg = transformers.UMT5Config(vocab_size=vocab, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                                  relative_attention_num_buckets=8, relative_attention_max_distance=16)
    torch.manual_seed(seed)
    transformers.UMT5EncoderModel(cfg).save_pretrained(str(path))
    save_tiny_tokenizer(tokenizer_dir or path)
    return str(path)


def wan_reference(enc_dir, tok_dir, prompts, max_length=512):
    """diffusers 0.42.1 WanPipeline._get_t5_prompt_embeds, minus the pipeline: (B, max_length, D), zeros past the
    real tokens, and the real token counts."""
    tok = transformers.AutoTokenizer.from_pretrained(tok_dir)
    model = transformers.UMT5EncoderModel.from_pretrained(enc_dir).eval()
    t = tok([te.prompt_clean(p) for p in prompts], padding="max_length", max_length=max_length, truncation=True,
            add_special_tokens=True, return_attention_mask=True, return_tensors="pt")
    seq_lens = t.attention_mask.gt(0).sum(dim=1).long()
    with torch.no_grad():
        h = model(t.input_ids, t.attention_mask).last_hidden_state
    h = [u[:v] for u, v in zip(h, seq_lens, strict=True)]
    return torch.stack([torch.cat([u, u.new_zeros(max_length - u.size(0), u.size(1))]) for u in h]), seq_lens


def test_prompt_clean_is_wans():
    assert te.prompt_clean("  a  red\n\tchair &amp;amp; car ") == "a red chair & car"
    wan = pytest.importorskip("diffusers.pipelines.wan.pipeline_wan")
    for text in ["  a  red\n\tchair &amp;amp; car ", "caf\u00e9 &lt;b&gt;", "x\u00a0\u2003y", ""]:
        assert te.prompt_clean(text) == wan.prompt_clean(text)


def test_encode_matches_wan_and_is_trimmed(tmp_path):
    d = save_tiny_umt5(tmp_path / "enc")
    enc = te.load_text_encoder(d)
    assert (enc.dim, enc.max_length) == (32, 512)
    assert not any(p.requires_grad for p in enc.parameters())
    prompts = ["a red chair", "a  blue car on a turntable video, rotating 360-degree", "cat"]
    got = enc.encode(prompts)
    ref, lens = wan_reference(d, d, prompts)
    assert [g.shape for g in got] == [(int(n), 32) for n in lens]
    assert len({g.shape[0] for g in got}) == 3  # different lengths: trimmed, not padded to the batch's longest
    for g, r, n in zip(got, ref, lens, strict=True):
        assert g.dtype == torch.float32
        torch.testing.assert_close(g, r[:n], rtol=1e-5, atol=1e-5)
        assert r[n:].abs().sum() == 0  # what Wan pads with, and what a consumer must pad with
    # A prompt's features do not depend on the other prompts of its batch.
    torch.testing.assert_close(enc.encode([prompts[2]])[0], got[2], rtol=1e-5, atol=1e-5)
    assert enc.count_tokens(prompts) == [int(n) for n in lens]


def test_truncates_to_max_length(tmp_path):
    d = save_tiny_umt5(tmp_path / "enc")
    enc = te.load_text_encoder(d, max_length=6)
    long = "a red chair on a blue car on a cat"
    (z,) = enc.encode([long])
    assert z.shape == (6, 32) and enc.count_tokens([long])[0] > 6
    ref, _ = wan_reference(d, d, [long], max_length=6)
    torch.testing.assert_close(z, ref[0], rtol=1e-5, atol=1e-5)


def test_checkpoint_layout_and_missing_dirs(tmp_path):
    root = tmp_path / "wan"
    save_tiny_umt5(root / "text_encoder", tokenizer_dir=root / "tokenizer")
    # A Wan checkpoint root, its text_encoder subfolder (tokenizer found as the sibling) and explicit folders.
    assert te.resolve_text_dirs(str(root)) == (str(root / "text_encoder"), str(root / "tokenizer"))
    assert te.resolve_text_dirs(str(root / "text_encoder"))[1] == os.path.abspath(root / "tokenizer")
    assert te.resolve_text_dirs(str(root / "text_encoder"), str(root / "tokenizer"))[1] == str(root / "tokenizer")
    assert te.load_text_encoder(str(root)).encode(["a cat"])[0].shape == (3, 32)  # ▁a ▁cat </s>
    with pytest.raises(FileNotFoundError, match="no-such-umt5"):
        te.load_text_encoder(str(tmp_path / "no-such-umt5"))
    with pytest.raises(FileNotFoundError, match="no-such-tok"):
        te.resolve_text_dirs(str(root), str(tmp_path / "no-such-tok"))
    (tmp_path / "lonely").mkdir()
    save_tiny_umt5(tmp_path / "lonely" / "enc", tokenizer_dir=tmp_path / "elsewhere")
    with pytest.raises(FileNotFoundError, match="tokenizer=DIR"):
        te.resolve_text_dirs(str(tmp_path / "lonely" / "enc"))


class TestTextEncoderContract(FrozenEncoderContract):
    """Shapes, determinism, save/load and frozen weights (tests/models/contract.py) of the umT5 wrapper; the output
    is the trimmed embeddings of the prompts, joined along the tokens."""

    output_shape = (4 + 3, 32)  # "a red chair": ▁a ▁red ▁chair </s>; "a cat": ▁a ▁cat </s> (seed 1: as many)
    leaves_global_rng = False  # the tiny umT5 is built under torch.manual_seed

    def make_model(self, seed=0):
        path = self.tmp_path / f"umt5-{seed}-{len(list(self.tmp_path.iterdir()))}"
        return te.load_text_encoder(save_tiny_umt5(path, seed=seed))

    def make_inputs(self, seed=0):
        return {"prompts": [["a red chair", "a cat"], ["a blue car", "the cat"]][seed % 2]}

    def forward(self, model, inputs):
        return torch.cat(model.encode(inputs["prompts"]))

    def save(self, model, path):
        model.encoder.save_pretrained(str(path))
        model.tokenizer.save_pretrained(str(path))

    def load(self, model, path):
        return te.load_text_encoder(str(path))
