"""Offline concept extraction: lemmatiser, precision/recall against hand-labelled captions, vocab building."""
import json
from pathlib import Path

import pytest

from mvptr_ds.data.concepts import (Lexicon, build_lexicon, build_vocab, extract_concepts, extract_tuples,
                                    extract_with_words, lemma_candidates, tokenize)
from mvptr_ds.data.caption_files import read_id2phrase
from mvptr_ds.data.readers import DataError

SHARED = Path(__file__).resolve().parents[3] / "shared" / "data"
VOCAB = SHARED / "id2phrase_new.json"
LABELS = SHARED / "VG-SGG-dicts-vgoi6-clipped.json"

GOLD = [
    ("A man riding a wave on top of a surfboard.",
     "man | wave | surfboard | man,ride,wave | man,ride on top of,surfboard"),
    ("A black and white cat sitting on a wooden bench.",
     "cat | bench | cat,black | cat,white | bench,wooden | cat,sit on,bench"),
    ("Two giraffes standing next to a tall tree.",
     "giraffe | tree | giraffe,two | tree,tall | giraffe,stand next to,tree"),
    ("A woman holding an umbrella in the rain.",
     "woman | umbrella | rain | woman,hold,umbrella | woman,in,rain"),
    ("A plate of food with broccoli and rice.",
     "plate | food | broccoli | rice | plate,of,food | food,with,broccoli | food,with,rice"),
    ("A red double decker bus driving down a city street.",
     "bus | street | bus,red | street,city | bus,drive down,street"),
    ("A young boy playing tennis on a court.",
     "boy | tennis | court | boy,young | boy,play,tennis | boy,play on,court"),
    ("A dog laying on a bed next to a pillow.",
     "dog | bed | pillow | dog,lay on,bed | bed,next to,pillow"),
    ("A kitchen with white cabinets and a stainless steel refrigerator.",
     "kitchen | cabinet | refrigerator | cabinet,white | refrigerator,stainless | refrigerator,steel | "
     "kitchen,with,cabinet | kitchen,with,refrigerator"),
    ("A man in a suit and tie talking on a cell phone.",
     "man | suit | tie | phone | man,in,suit | man,in,tie | man,talk on,phone | phone,cell"),
    ("A large jet airplane flying through a blue sky.",
     "airplane | sky | airplane,large | airplane,jet | sky,blue | airplane,fly through,sky"),
    ("Several people are skiing down a snowy mountain.",
     "people | mountain | people,several | mountain,snowy | people,ski down,mountain"),
    ("A little girl eating a slice of pizza.",
     "girl | slice | pizza | girl,little | girl,eat,slice | slice,of,pizza"),
    ("A brown horse grazing in a green field.",
     "horse | field | horse,brown | field,green | horse,graze in,field"),
    ("A bathroom with a toilet and a sink.",
     "bathroom | toilet | sink | bathroom,with,toilet | bathroom,with,sink"),
    ("Three zebras walking across a dirt road.",
     "zebra | road | zebra,three | road,dirt | zebra,walk across,road"),
    ("A person flying a kite on the beach.",
     "person | kite | beach | person,fly,kite | person,fly on,beach"),
    ("A cat is sleeping on top of a laptop computer.",
     "cat | computer | computer,laptop | cat,sleep on top of,computer"),
    ("Two men sitting at a table with laptops.",
     "man | table | laptop | man,two | man,sit at,table | table,with,laptop"),
    ("A baseball player swinging a bat at a ball.",
     "player | bat | ball | player,baseball | player,swing,bat | player,swing at,ball"),
    ("An elephant standing in the water near some trees.",
     "elephant | water | tree | elephant,stand in,water | elephant,stand near,tree"),
    ("A young man doing a trick on a skateboard.",
     "man | trick | skateboard | man,young | man,do,trick | man,do on,skateboard"),
    ("A bowl of fruit sitting on a table.",
     "bowl | fruit | table | bowl,of,fruit | bowl,sit on,table"),
    ("A train traveling down the tracks next to a station.",
     "train | track | station | train,travel down,track | track,next to,station"),
    ("A group of people standing around a table.",
     "group | people | table | group,of,people | people,stand around,table"),
    ("A small dog wearing a red collar.",
     "dog | collar | dog,small | collar,red | dog,wear,collar"),
    ("A man and a woman cutting a cake.",
     "man | woman | cake | man,cut,cake | woman,cut,cake"),
    ("An old clock tower in the middle of a city.",
     "tower | middle | city | tower,old | tower,clock | tower,in,middle | middle,of,city"),
    ("A child holding a teddy bear.",
     "child | bear | bear,teddy | child,hold,bear"),
    ("A pizza topped with cheese and tomatoes on a wooden table.",
     "pizza | cheese | tomato | table | table,wooden | pizza,top with,cheese | pizza,top with,tomato | "
     "pizza,on,table"),
    ("A motorcycle parked on the side of the road.",
     "motorcycle | side | road | motorcycle,park on,side | side,of,road"),
    ("Two birds perched on a branch of a tree.",
     "bird | branch | tree | bird,two | bird,perch on,branch | branch,of,tree"),
]


def _gold(spec):
    return {tuple(e.strip() for e in t.split(",")) for t in spec.split("|")}


@pytest.fixture(scope="module")
def authors():
    if not VOCAB.exists() or not LABELS.exists():
        pytest.skip(f"{VOCAB} or {LABELS} not available")
    vocab = read_id2phrase(str(VOCAB))
    return vocab, build_lexicon(vocab, str(LABELS))


def test_precision_recall_against_hand_labels(authors):
    """Gold tuples are a careful annotator's (SPICE conventions); scored on those in the authors' vocab."""
    vocab, lex = authors
    tp = fp = fn = total = 0
    for caption, spec in GOLD:
        gold = _gold(spec)
        total += len(gold)
        gold = {t for t in gold if vocab.lookup(t) is not None}
        pred = set(extract_tuples(caption, lex))
        assert all(vocab.lookup(t) is not None for t in pred)
        tp, fp, fn = tp + len(pred & gold), fp + len(pred - gold), fn + len(gold - pred)
    precision, recall = tp / (tp + fp), tp / (tp + fn)
    print(f"\nconcept extraction on {len(GOLD)} captions: {total} gold tuples, {tp + fn} in the authors' "
          f"vocabulary; precision {precision:.3f} recall {recall:.3f}")
    assert len(GOLD) >= 30 and tp + fn >= 150
    assert precision >= 0.85 and recall >= 0.90


def test_lemmatiser_follows_the_lexicon():
    lex = Lexicon(nouns={"man": 5, "shorts": 3, "bus": 2, "tomato": 1, "glass": 2, "leaf": 1},
                  verbs={"sit": 3, "ride": 2, "lie": 1, "park": 1, "top": 1})
    from mvptr_ds.data.concepts import best_lemma
    for word, counts, want in [("men", lex.nouns, "man"), ("shorts", lex.nouns, "shorts"),
                               ("buses", lex.nouns, "bus"), ("tomatoes", lex.nouns, "tomato"),
                               ("glasses", lex.nouns, "glass"), ("leaves", lex.nouns, "leaf"),
                               ("sitting", lex.verbs, "sit"), ("rides", lex.verbs, "ride"),
                               ("lying", lex.verbs, "lie"), ("parked", lex.verbs, "park"),
                               ("topped", lex.verbs, "top"), ("zebra", lex.nouns, "zebra")]:
        assert best_lemma(word, counts)[0] == want, word
    assert "do" in lemma_candidates("doing") and "tie" in lemma_candidates("tying")
    assert [w for w, _, _ in tokenize("A man's dog, sitting.")] == ["a", "man", "'s", "dog", ",", "sitting", "."]


def test_words_of_each_tuple(authors):
    _, lex = authors
    caption = "A man riding a wave on top of a surfboard."
    words = [w for w, _, _ in tokenize(caption)]
    got = dict(extract_with_words(caption, lex))
    assert [words[i] for i in got[("man", "ride", "wave")]] == ["man", "riding", "wave"]
    assert [words[i] for i in got[("surfboard",)]] == ["surfboard"]


def _small_world(tmp_path, with_phrases):
    caps = []
    for k in range(12):
        caps.append({"image_id": k, "caption": "A black dog sitting on a wooden bench."})
        caps.append({"image_id": k, "caption": "Two men riding horses on the beach."})
    caps.append({"image_id": 99, "caption": "A red kite."})
    if with_phrases:
        for c in caps:
            c["phrases"] = ([["dog"], ["dog", "black"], ["dog", "sit on", "bench"]] if "dog" in c["caption"]
                            else [["kite"], ["kite", "red"]] if "kite" in c["caption"] else [["man"], ["man", "two"]])
    p = tmp_path / "captions.jsonl"
    p.write_text("".join(json.dumps(c) + "\n" for c in caps))
    return p


def test_build_vocab_from_phrases_with_tokenizer_ids(tmp_path):
    caps = _small_world(tmp_path, True)
    (tmp_path / "tok").mkdir()
    (tmp_path / "tok" / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]",
                                                           "dog", "black"]) + "\n")
    rep = build_vocab(str(caps), str(tmp_path / "v.json"), min_sentences=10, tokenizer=str(tmp_path / "tok"))
    v = read_id2phrase(str(tmp_path / "v.json"))
    assert rep["kept"] == 5 and rep["sentences"] == 25 and rep["distinct_tuples"] == 7
    assert v.lookup(["dog"]) == 5                      # a word piece keeps its word id
    assert [v.lookup(t) for t in (["dog", "black"], ["dog", "sit on", "bench"], ["man", "two"], ["man"])] == \
        [7, 8, 9, 10]                                  # tuples by count then name, then missing words
    assert v.lookup(["kite"]) is None                  # 1 sentence < 10
    rep = build_vocab(str(caps), str(tmp_path / "v2.json"), min_sentences=1, word_vocab_size=100)
    v2 = read_id2phrase(str(tmp_path / "v2.json"))
    assert sorted(v2.id_to_tuple) == list(range(100, 107)) and v2.id_to_tuple[103] == ("kite", "red")
    assert v2.id_to_tuple[106] == ("kite",)
    with pytest.raises(DataError) as e:
        build_vocab(str(_small_world(tmp_path, False)), str(tmp_path / "v3.json"), min_sentences=1)
    assert "captions.jsonl" in str(e.value) and "line 1" in str(e.value) and "'phrases'" in str(e.value)


def test_build_own_vocab_then_extract(tmp_path):
    if not LABELS.exists():
        pytest.skip(f"{LABELS} not available")
    caps = _small_world(tmp_path, False)
    rep = build_vocab(str(caps), str(tmp_path / "v.json"), min_sentences=10, labels=str(LABELS))
    v = read_id2phrase(str(tmp_path / "v.json"))
    kept = set(v.tuple_to_id)
    for t in [("dog",), ("dog", "black"), ("bench", "wooden"), ("dog", "sit on", "bench"), ("man", "two"),
              ("man", "ride", "horse")]:
        assert t in kept, t
    assert ("kite",) not in kept and rep["extracted_sentences"] == 25
    rep2 = extract_concepts(str(caps), str(tmp_path / "v.json"), str(tmp_path / "out.jsonl"), labels=str(LABELS))
    lines = [json.loads(x) for x in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert len(lines) == 25 and rep2["captions"] == 25 and rep2["captions_without_tuples"] == 1
    assert all(tuple(t) in kept for r in lines for t in r["phrases"])
    assert ["dog", "sit on", "bench"] in lines[0]["phrases"] and lines[-1]["phrases"] == []
    # deterministic
    extract_concepts(str(caps), str(tmp_path / "v.json"), str(tmp_path / "out2.jsonl"), labels=str(LABELS))
    assert (tmp_path / "out.jsonl").read_bytes() == (tmp_path / "out2.jsonl").read_bytes()


def test_extract_concepts_with_authors_vocab_reports_unknown_given_tuples(tmp_path, authors):
    caps = tmp_path / "captions.json"
    caps.write_text(json.dumps([
        {"image_id": "a", "caption": "A man riding a wave on top of a surfboard.",
         "phrases": [["man"], ["man", "surf", "qwertyuiop"]]},
        {"image_id": "b", "caption": "A plate of food with broccoli."}]))
    rep = extract_concepts(str(caps), str(VOCAB), str(tmp_path / "out.jsonl"))
    assert rep["given_tuples_not_in_vocab"] == 1
    assert rep["given_not_in_vocab_examples"] == [["man", "surf", "qwertyuiop"]]
    out = [json.loads(x) for x in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert ["man", "ride", "wave"] in out[0]["phrases"] and ["plate", "of", "food"] in out[1]["phrases"]
    assert rep["relation_triples"] >= 3 and rep["tuples"] == sum(len(r["phrases"]) for r in out)
