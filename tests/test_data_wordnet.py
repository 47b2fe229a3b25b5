"""WordNet lexicon: a tiny database in the real WordNet file format, read through NLTK's reader
(the same code path as the Debian files), and the real files where they are installed."""
import os
import pickle

import numpy as np
import pytest

pytest.importorskip("nltk")

from fine_jax.data import wordnet  # noqa: E402
from fine_jax.data.text import Tokenizer, build_stage1_text  # noqa: E402

_FILES = {"n": "noun", "v": "verb", "a": "adj", "r": "adv"}
_LEX_FILE = {"n": 3, "v": 29, "a": 0, "r": 2}
_HEADER = "  1 tiny WordNet-format database for the fine_jax tests  \n"


def write_wordnet_dict(directory, synsets, exceptions=None):
    """Writes ``synsets`` in the WordNet 3.0 database format (wndb(5WN)).

    ``synsets``: ``(pos, words, antonym_links)``; ``pos`` is n/v/a/r, ``words`` the lemma names and
    ``antonym_links`` pairs ``(word_number, synset_number)``: word ``word_number`` (0-based) of this
    synset has the first word of synset ``synset_number`` (0-based, same pos) as antonym. Offsets
    are byte offsets into the data file, 8 digits wide, so line lengths do not depend on them.
    ``exceptions``: {pos: ["inflected base", ...]}, the morphological exception lists.
    """
    os.makedirs(directory, exist_ok=True)
    for pos, name in _FILES.items():
        members = [i for i, s in enumerate(synsets) if s[0] == pos]
        offsets, position = {}, len(_HEADER)
        for i in members:  # first pass: offsets (every line has the same length on both passes)
            offsets[i] = position
            position += len(_data_line(synsets, i, pos, offsets))
        with open(os.path.join(directory, f"data.{name}"), "w", encoding="ascii") as f:
            f.write(_HEADER + "".join(_data_line(synsets, i, pos, offsets) for i in members))
        index = {}
        for i in members:
            for w in synsets[i][1]:
                index.setdefault(w.lower(), []).append(offsets[i])
        with open(os.path.join(directory, f"index.{name}"), "w", encoding="ascii") as f:
            f.write(_HEADER)
            for lemma in sorted(index):
                offs = index[lemma]
                f.write(f"{lemma} {pos} {len(offs)} 0 {len(offs)} 0 "
                        + " ".join(f"{o:08d}" for o in offs) + " \n")
        with open(os.path.join(directory, f"{name}.exc"), "w", encoding="ascii") as f:
            f.write("".join(line + "\n" for line in (exceptions or {}).get(pos, [])))


def _data_line(synsets, i, pos, offsets):
    _, words, links = synsets[i]
    pointers = "".join(f"! {offsets.get(j, 0):08d} {pos} {w + 1:02x}01 " for w, j in links)
    frames = "00 " if pos == "v" else ""
    words_field = " ".join(f"{w} 0" for w in words)
    return (f"{offsets.get(i, 0):08d} {_LEX_FILE[pos]:02d} {pos} {len(words):02x} {words_field} "
            f"{len(links):03d} {pointers}{frames}| a gloss\n")


# 0: adj light/pale  <-> 2: adj dark;  1: adj light (second sense) <-> 3: adj heavy
# 4: noun jacket/coat;  5: noun black/blackness <-> 6: noun white/whiteness;  7: verb zip <-> 8: unzip
TINY = [
    ("a", ["light", "pale"], [(0, 2)]),
    ("a", ["light", "lightweight"], [(0, 3)]),
    ("a", ["dark"], [(0, 0)]),
    ("a", ["heavy"], [(0, 1)]),
    ("n", ["jacket", "Coat", "jacket_crown"], []),
    ("n", ["black", "blackness"], [(0, 6)]),
    ("n", ["white", "whiteness"], [(0, 5)]),
    ("v", ["zip", "zip_up"], [(0, 8)]),
    ("v", ["unzip"], [(0, 7)]),
]


@pytest.fixture
def tiny_wordnet(tmp_path):
    directory = tmp_path / "wordnet"
    write_wordnet_dict(directory, TINY, exceptions={"v": ["zipped zip"]})
    return directory


def test_tiny_database_antonyms_and_synonyms(tiny_wordnet):
    lex = wordnet.WordNetLexicon(tiny_wordnet)
    # One first-antonym per antonym-bearing lemma of every synset, duplicates kept.
    assert lex.antonyms("light") == ["dark", "heavy"]
    assert lex.antonyms("Light") == ["dark", "heavy"]  # WordNet lookups ignore case
    assert lex.antonyms("pale") == ["dark"]
    assert lex.antonyms("black") == ["white"]
    assert lex.antonyms("zip") == ["unzip"]
    assert lex.antonyms("jacket") == []
    assert lex.antonyms("##s") == [] and lex.antonyms("") == []
    # Distinct lemma names of all synsets, the word itself included, case as stored.
    assert lex.synonyms("light") == ["light", "pale", "lightweight"]
    assert lex.synonyms("coat") == ["jacket", "Coat", "jacket_crown"]
    # NLTK's morphy lemmatises: "jackets" finds the noun "jacket" by rule, "zipped" the verb "zip"
    # through the exception list.
    assert lex.synonyms("jackets") == ["jacket", "Coat", "jacket_crown"]
    assert lex.synonyms("zipped") == ["zip", "zip_up"]
    assert lex.synonyms("cotton") == []


def test_lexicon_pickles_without_its_reader(tiny_wordnet):
    lex = wordnet.WordNetLexicon(tiny_wordnet)
    assert lex.antonyms("black") == ["white"]
    blob = pickle.dumps(lex)
    assert len(blob) < 500  # the directory only, not the database
    again = pickle.loads(blob)
    assert again._reader is None
    assert again.antonyms("black") == ["white"]


def test_stage1_draws_antonyms_from_wordnet(tiny_wordnet, tmp_path):
    from fine_jax.data.text import SYMBOL_TOKENS

    words = [f"w{i}" for i in range(70)]
    vocab = ["[PAD]", *SYMBOL_TOKENS, "[UNK]", "[CLS]", "[SEP]", "[MASK]", "light", "dark", "heavy",
             *"the image description is category sub composition gender name season spring summer "
              "2017 and tops men cotton".split(), *words]
    (tmp_path / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tok = Tokenizer.from_vocab_file(tmp_path / "vocab.txt")
    lex = wordnet.WordNetLexicon(tiny_wordnet)
    rec = dict(description=" ".join(["light"] * 70), category="Tops", subcategory="tops",
               composition="cotton", gender="men", name="light", season="SS2017")
    seen = set()
    for seed in range(40):
        out = build_stage1_text(rec, tok, {"tops": "[tops_sign]"}, lex, np.random.default_rng(seed), 180)
        replaced = out["input_ids"][out["replace_labels"] == 1]
        seen.update(tok.id_to_token(int(i)) for i in replaced)
    assert {"dark", "heavy"} <= seen  # antonym replacements came from the database


def test_missing_database_is_one_clear_message(tmp_path, monkeypatch):
    with pytest.raises(wordnet.WordNetMissing, match="apt-get install wordnet-base") as e:
        wordnet.WordNetLexicon(tmp_path / "nowhere")
    assert "data.wordnet_dir" in str(e.value) and "data.lexicon=none" in str(e.value)
    (tmp_path / "partial").mkdir()
    (tmp_path / "partial" / "index.noun").write_text("")
    with pytest.raises(wordnet.WordNetMissing, match="missing: data.noun"):
        wordnet.find_wordnet_dir(tmp_path / "partial")
    monkeypatch.setattr(wordnet, "DEFAULT_DIRS", (str(tmp_path / "a"), str(tmp_path / "b")))
    monkeypatch.delenv(wordnet.WORDNET_ENV, raising=False)
    with pytest.raises(wordnet.WordNetMissing, match="looked in"):
        wordnet.find_wordnet_dir()


def test_environment_variable_selects_the_directory(tiny_wordnet, monkeypatch):
    monkeypatch.setattr(wordnet, "DEFAULT_DIRS", ())
    monkeypatch.setenv(wordnet.WORDNET_ENV, str(tiny_wordnet))
    assert wordnet.find_wordnet_dir() == str(tiny_wordnet)


def test_embedded_lexnames_match_the_manual():
    lines = wordnet.LEXNAMES_TEXT.splitlines()
    assert len(lines) == 45
    assert lines[0] == "00\tadj.all\t3" and lines[3] == "03\tnoun.Tops\t1" and lines[44] == "44\tadj.ppl\t3"


REAL = "/usr/share/wordnet"


@pytest.mark.skipif(wordnet.missing_files(REAL) if os.path.isdir(REAL) else True,
                    reason="Debian wordnet-base is not installed")
def test_real_debian_wordnet():
    lex = wordnet.WordNetLexicon(REAL)
    assert "white" in lex.antonyms("black")
    assert lex.antonyms("black").count("white") >= 2  # duplicates kept, as in the reference
    assert "short" in lex.antonyms("long")
    assert lex.antonyms("##s") == [] and lex.antonyms("100%") == []
    syn = lex.synonyms("Cotton")
    assert syn[:2] == ["cotton", "cotton_fiber"] or "cotton" in syn
    assert "jacket" in lex.synonyms("jackets")


def test_lookups_from_many_threads_read_the_same_entries(tiny_wordnet):
    """The grain pipeline looks words up from several threads (data.num_threads); NLTK's reader
    shares its file handles, so unguarded lookups read each other's lines."""
    from concurrent.futures import ThreadPoolExecutor

    words = ["light", "pale", "black", "zip", "coat", "jackets", "zipped", "dark", "white",
             "heavy", "unzip", "jacket", "cotton"]
    one = wordnet.WordNetLexicon(tiny_wordnet)
    expected = {w: (one.antonyms(w), one.synonyms(w)) for w in words}
    for _ in range(30):
        lex = wordnet.WordNetLexicon(tiny_wordnet)  # nothing memoised: every lookup reads

        def look(w, lex=lex):
            return w, (lex.antonyms(w), lex.synonyms(w))

        with ThreadPoolExecutor(8) as pool:
            got = dict(pool.map(look, words * 4))
        assert got == expected
