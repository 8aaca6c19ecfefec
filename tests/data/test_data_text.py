"""The unlabeled ``text`` dataset, with a BERT tokenizer built offline from a vocabulary written here."""

from __future__ import annotations

import pytest
import torch

from qready.data import load_dataset, make_loaders

transformers = pytest.importorskip("transformers", reason="the text dataset tokenizes with Hugging Face tokenizers")

WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "cat", "sat", "on", "mat", "a", "dog", "ran", "##s", "."]
LINES = ["the cat sat on the mat.", "a dog ran.", "", "the dog sat on a cat.", "   ", "cats ran on the mat.",
         "a cat.", "the mat sat.", "dogs sat on a dog on a mat.", "the cat ran."]


@pytest.fixture()
def tokenizer(tmp_path):
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("\n".join(WORDS) + "\n")
    return transformers.BertTokenizerFast(vocab=str(vocab))


@pytest.fixture()
def text_file(tmp_path):
    path = tmp_path / "lines.txt"
    path.write_text("\n".join(LINES) + "\n")
    return path


def test_items_are_padded_dicts(text_file, tokenizer):
    splits = load_dataset("text", root=text_file, tokenizer=tokenizer, max_length=8, test_fraction=0.25)
    assert len(splits.train) + len(splits.test) == 8  # blank lines dropped
    assert len(splits.test) == 2 and splits.num_classes == 0 and splits.input_shape == (8,)
    lines = [line.strip() for line in LINES if line.strip()]
    for split in (splits.train, splits.test):
        for i in range(len(split)):
            item = split[i]
            assert set(item) == {"input_ids", "attention_mask"}
            ids, mask = item["input_ids"], item["attention_mask"]
            assert ids.shape == mask.shape == (8,) and ids.dtype == mask.dtype == torch.long
            n = int(mask.sum())
            assert torch.all(mask[:n] == 1) and torch.all(mask[n:] == 0)  # right padding
            assert torch.all(ids[n:] == tokenizer.pad_token_id)
            expected = tokenizer(lines, truncation=True, max_length=8)["input_ids"]
            assert ids[:n].tolist() in expected
    first = tokenizer("the cat sat on the mat.", truncation=True, max_length=8)["input_ids"]
    assert len(first) == 8 and first[-1] == tokenizer.sep_token_id  # truncated, still ends with [SEP]


def test_split_by_line_is_seeded(text_file, tokenizer):
    def rows(seed):
        s = load_dataset("text", root=text_file, tokenizer=tokenizer, seed=seed, max_length=12)
        return [s.test[i]["input_ids"].tolist() for i in range(len(s.test))]

    assert rows(0) == rows(0)
    assert any(rows(0) != rows(seed) for seed in (1, 2, 3))


def test_loader_yields_dict_batches(text_file, tokenizer):
    splits = load_dataset("text", root=text_file, tokenizer=tokenizer, max_length=6)
    train, _ = make_loaders(splits, batch_size=3, seed=0)
    batch = next(iter(train))
    assert set(batch) == {"input_ids", "attention_mask"} and batch["input_ids"].shape == (3, 6)


def test_dict_batches_run_a_config_built_bert(text_file, tokenizer):
    config = transformers.BertConfig(vocab_size=len(WORDS), hidden_size=16, num_hidden_layers=1,
                                     num_attention_heads=2, intermediate_size=32, max_position_embeddings=16)
    torch.manual_seed(0)
    model = transformers.BertModel(config).eval()
    splits = load_dataset("text", root=text_file, tokenizer=tokenizer, max_length=10)
    batch = next(iter(make_loaders(splits, batch_size=4, seed=0)[1]))
    with torch.no_grad():
        out = model(**batch).last_hidden_state
    assert out.shape == (len(splits.test), 10, 16) and torch.isfinite(out).all()


def test_tokenizer_directory(text_file, tokenizer, tmp_path):
    tokenizer.save_pretrained(tmp_path / "tok")
    a = load_dataset("text", root=text_file, tokenizer=tokenizer, max_length=8)
    b = load_dataset("text", root=text_file, tokenizer=str(tmp_path / "tok"), max_length=8)
    assert torch.equal(a.train.input_ids, b.train.input_ids)
    assert torch.equal(a.test.attention_mask, b.test.attention_mask)


def test_pads_with_eos_when_the_tokenizer_has_no_pad_token(text_file):
    class EosOnly:  # a GPT-2-style tokenizer: an end-of-text token, no pad token
        pad_token_id = None
        eos_token_id = 99

        def __call__(self, lines, truncation, max_length):
            return {"input_ids": [[len(w) for w in line.split()][:max_length] for line in lines]}

    splits = load_dataset("text", root=text_file, tokenizer=EosOnly(), max_length=7)
    ids, mask = splits.train.input_ids, splits.train.attention_mask
    assert torch.all(ids[mask == 0] == 99) and (mask == 0).any()


def test_errors(text_file, tokenizer, tmp_path):
    with pytest.raises(FileNotFoundError, match="root=FILE"):
        load_dataset("text", tokenizer=tokenizer)
    with pytest.raises(FileNotFoundError, match="not a file"):
        load_dataset("text", root=tmp_path / "missing.txt", tokenizer=tokenizer)
    with pytest.raises(ValueError, match="option 'tokenizer'"):
        load_dataset("text", root=text_file)
    with pytest.raises(ValueError, match="option 'tokenizer'"):
        load_dataset("text", root=text_file, tokenizer=3)
    with pytest.raises(FileNotFoundError, match="save_pretrained"):
        load_dataset("text", root=text_file, tokenizer=str(tmp_path / "no_tokenizer"))
    with pytest.raises(ValueError, match="max_length"):
        load_dataset("text", root=text_file, tokenizer=tokenizer, max_length=0)
    with pytest.raises(ValueError, match="test_fraction"):
        load_dataset("text", root=text_file, tokenizer=tokenizer, test_fraction=0.0)
    one = tmp_path / "one.txt"
    one.write_text("only one line\n\n")
    with pytest.raises(ValueError, match="at least 2 non-blank lines"):
        load_dataset("text", root=one, tokenizer=tokenizer)
