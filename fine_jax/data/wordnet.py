"""WordNet antonyms and synonyms for the stage-1 text corruption, from local WordNet 3.0 files.

The reference calls NLTK's ``wordnet`` corpus (downloaded at run time) in two places
(FashionSAP ``dataset/utils.py``):

* ``search_antonym(word)``: for every synset of ``word`` (all parts of speech, after NLTK's morphy
  lemmatisation), every lemma that has antonyms contributes the name of its *first* antonym;
  duplicates are kept, and one candidate is drawn uniformly.
* ``search_synonym(word)``: the distinct lemma names of all synsets of ``word``, one drawn
  uniformly.

:class:`WordNetLexicon` gives the same candidate lists through NLTK's own ``WordNetCorpusReader``,
reading the database files of a local directory (Debian/Ubuntu: ``apt-get install wordnet-base``,
files in ``/usr/share/wordnet``; or any WordNet 3.0 ``dict`` folder, e.g. ``$WNHOME/dict``). Nothing
is downloaded. Two details of those files are bridged here:

* NLTK expects a ``lexnames`` file that the Princeton distribution documents (lexnames(5WN)) but
  Debian does not install; its fixed 45-entry table is embedded below. Lexicographer file names
  only label synsets, they do not change any lookup used here.
* NLTK's reader maps non-3.0 databases to 3.0 through the separately downloaded ``wordnet`` corpus
  for its multilingual functions; those are not used, so the mapping is switched off.

The reader is built on first use in each process and is never pickled: a lexicon handed to grain
worker processes carries only the directory and rebuilds its reader there (about 1.5 s).
"""
from __future__ import annotations

import io
import os
import threading
import warnings
WORDNET_ENV = "FINE_JAX_WORDNET_DIR"
DEFAULT_DIRS: tuple[str, ...] = ("/usr/share/wordnet", "/usr/local/share/wordnet",
                                 "/usr/local/WordNet-3.0/dict", "/opt/homebrew/share/wordnet")
# Files the reader opens: the four index/data pairs and the morphological exception lists.
REQUIRED_FILES: tuple[str, ...] = tuple(
    f"{kind}.{pos}" for pos in ("noun", "verb", "adj", "adv") for kind in ("index", "data")
) + tuple(f"{pos}.exc" for pos in ("noun", "verb", "adj", "adv"))

INSTALL_HELP = (
    "WordNet 3.0 database files were not found{where}. The stage-1 text corruption draws antonyms "
    "and synonyms from WordNet (method_spec §4.4). Install them with\n"
    "    sudo apt-get install wordnet-base        # Debian/Ubuntu: files in /usr/share/wordnet\n"
    "and/or point fine_jax at a WordNet 3.0 'dict' folder with --config.data.wordnet_dir=DIR "
    f"(or ${WORDNET_ENV}=DIR). To train without antonyms/synonyms, set --config.data.lexicon=none."
)

# lexnames(5WN): file number, lexicographer file name, syntactic category.
_LEXNAMES = (
    "adj.all 3", "adj.pert 3", "adv.all 4", "noun.Tops 1", "noun.act 1", "noun.animal 1",
    "noun.artifact 1", "noun.attribute 1", "noun.body 1", "noun.cognition 1",
    "noun.communication 1", "noun.event 1", "noun.feeling 1", "noun.food 1", "noun.group 1",
    "noun.location 1", "noun.motive 1", "noun.object 1", "noun.person 1", "noun.phenomenon 1",
    "noun.plant 1", "noun.possession 1", "noun.process 1", "noun.quantity 1", "noun.relation 1",
    "noun.shape 1", "noun.state 1", "noun.substance 1", "noun.time 1", "verb.body 2",
    "verb.change 2", "verb.cognition 2", "verb.communication 2", "verb.competition 2",
    "verb.consumption 2", "verb.contact 2", "verb.creation 2", "verb.emotion 2", "verb.motion 2",
    "verb.perception 2", "verb.possession 2", "verb.social 2", "verb.stative 2",
    "verb.weather 2", "adj.ppl 3",
)
LEXNAMES_TEXT = "".join(f"{i:02d}\t{entry.replace(' ', chr(9))}\n" for i, entry in enumerate(_LEXNAMES))


class WordNetMissing(FileNotFoundError):
    """No usable WordNet database; the message says how to install one."""


def missing_files(directory: str | os.PathLike) -> list[str]:
    directory = os.fspath(directory)
    return [f for f in REQUIRED_FILES if not os.path.isfile(os.path.join(directory, f))]


def find_wordnet_dir(directory: str | os.PathLike | None = None) -> str:
    """The WordNet directory to use: ``directory`` if given, else ``$FINE_JAX_WORDNET_DIR``, else
    the first of :data:`DEFAULT_DIRS` that holds the database. Raises :class:`WordNetMissing`."""
    if directory:
        directory = os.path.abspath(os.path.expanduser(os.fspath(directory)))
        missing = missing_files(directory)
        if missing:
            raise WordNetMissing(INSTALL_HELP.format(
                where=f" in {directory} (missing: {', '.join(missing)})"))
        return directory
    candidates = ([os.environ[WORDNET_ENV]] if os.environ.get(WORDNET_ENV) else []) + list(DEFAULT_DIRS)
    for candidate in candidates:
        if os.path.isdir(candidate) and not missing_files(candidate):
            return os.path.abspath(candidate)
    raise WordNetMissing(INSTALL_HELP.format(where=f" (looked in {', '.join(candidates)})"))


def _open_reader(directory: str):
    """NLTK's ``WordNetCorpusReader`` over ``directory`` (see the module docstring)."""
    try:
        import nltk
        from nltk.corpus.reader.wordnet import WordNetCorpusReader
    except ImportError as e:
        raise ImportError("reading WordNet needs NLTK: pip install nltk") from e

    class _LocalWordNetReader(WordNetCorpusReader):
        def open(self, file):
            if file == "lexnames" and not os.path.isfile(os.path.join(directory, "lexnames")):
                return io.StringIO(LEXNAMES_TEXT)
            return super().open(file)

        def map_wn(self, version="wordnet"):
            return None

    # NLTK only opens corpus files below its data paths.
    if directory not in nltk.data.path:
        nltk.data.path.append(directory)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The multilingual functions are not available")
        return _LocalWordNetReader(directory, None)


class WordNetLexicon:
    """Antonym/synonym candidates of a word from WordNet, as the reference computes them.

    Same interface as :class:`fine_jax.data.text.Lexicon`. Results are memoised per process (the
    stage-1 builder asks for the same word-pieces and attribute words over and over).

    Thread-safe: NLTK's reader seeks and reads shared file handles, so two threads looking up
    words at once (the grain pipeline's ``data.num_threads``) would read each other's lines; every
    database read holds one lock, and memoised words need none.
    """

    def __init__(self, directory: str | os.PathLike | None = None):
        self.directory = find_wordnet_dir(directory)
        self._reader = None
        self._pid = None
        self._lock = threading.Lock()
        self._antonyms: dict[str, tuple[str, ...]] = {}
        self._synonyms: dict[str, tuple[str, ...]] = {}

    def __getstate__(self):
        return {"directory": self.directory}

    def __setstate__(self, state):
        self.directory = state["directory"]
        self._reader = None
        self._pid = None
        self._lock = threading.Lock()
        self._antonyms = {}
        self._synonyms = {}

    def __repr__(self) -> str:
        return f"WordNetLexicon({self.directory!r})"

    @property
    def reader(self):
        if self._reader is None or self._pid != os.getpid():
            self._reader = _open_reader(self.directory)
            self._pid = os.getpid()
        return self._reader

    def _synsets(self, word: str):
        return self.reader.synsets(word) if word else []

    def antonyms(self, word: str) -> list[str]:
        """First antonym of every antonym-bearing lemma of every synset, duplicates kept."""
        cached = self._antonyms.get(word)
        if cached is None:
            with self._lock:  # lemma.antonyms() reads the database too
                names = []
                for synset in self._synsets(word):
                    for lemma in synset.lemmas():
                        antonyms = lemma.antonyms()
                        if antonyms:
                            names.append(antonyms[0].name())
                cached = self._antonyms[word] = tuple(names)
        return list(cached)

    def synonyms(self, word: str) -> list[str]:
        """Distinct lemma names of all synsets, in WordNet's order (the word itself included)."""
        cached = self._synonyms.get(word)
        if cached is None:
            with self._lock:
                names: dict[str, None] = {}
                for synset in self._synsets(word):
                    names.update(dict.fromkeys(synset.lemma_names()))
                cached = self._synonyms[word] = tuple(names)
        return list(cached)

