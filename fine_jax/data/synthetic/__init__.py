"""FashionGen in miniature: a procedurally drawn fine-grained fashion set, deterministic from a seed.

* :mod:`~fine_jax.data.synthetic.catalogue`: categories, attributes, products and their twins.
* :mod:`~fine_jax.data.synthetic.rendering`: drawing one view of a product.
* :mod:`~fine_jax.data.synthetic.captions`: FashionGen-style descriptions and the WordPiece vocab.
* :mod:`~fine_jax.data.synthetic.storage`: the FashionGen-schema files and the cached folder
  (:func:`ensure_dataset`).
* :mod:`~fine_jax.data.synthetic.tgir`: a FashionIQ-layout variant for text-guided image
  retrieval (:func:`ensure_tgir_dataset`).
"""
from fine_jax.data.synthetic.captions import (LEXICON, SPECIAL_TOKENS, SYMBOL_TOKENS, build_vocab, count_unknown,
                                              detail_sentence, vocab_texts)
from fine_jax.data.synthetic.catalogue import (BRANDS, CATEGORY_SYMBOLS, COLOURS, DEFAULT_NUM_TRAIN,
                                               DEFAULT_NUM_VALIDATION, PATTERNS, SEASONS, SECOND_COLOURS,
                                               SUBCATEGORIES, SUBCATEGORY_BY_NAME, Product, Subcategory,
                                               make_products, redrawn_products)
from fine_jax.data.synthetic.rendering import DEFAULT_IMAGE_SIZE, DEFAULT_VIEWS, geometry, render
from fine_jax.data.synthetic.storage import (CATEGORY_SIGN_FILE, GENERATOR, GENERATOR_VERSION, LEXICON_FILE,
                                             MANIFEST_FILE, PRODUCTS_FILE, SPLIT_FILES, TRAIN_FILE, TWINS_FILE,
                                             VALIDATION_FILE, VOCAB_FILE, ensure_dataset, generate_dataset,
                                             load_twins, split_path)
from fine_jax.data.synthetic.tgir import ensure_tgir_dataset, generate_tgir_dataset, load_tgir_products
