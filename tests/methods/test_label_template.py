"""``label_template``: how a label name becomes its label text (``ltuning.data.default_label_text``) for lt-prefix /
lt-prompt, saved with the adapter and used again by ``add_labels``."""
from __future__ import annotations

import os

import pytest

import ltuning
from ltuning.data import LABEL_TEMPLATES, LABEL_TEXTS, default_label_text

from method_helpers import tiny_base


def test_templates_on_curated_and_unseen_names():
    assert LABEL_TEMPLATES == ("curated", "sentence", "name")
    # a GLUE name: the hand-written sentence only under "curated"
    assert default_label_text("not_entailment") == LABEL_TEXTS["not_entailment"]
    assert default_label_text("not_entailment", "curated") == LABEL_TEXTS["not_entailment"]
    assert default_label_text("not_entailment", "sentence") == "The label of the text is not entailment."
    assert default_label_text("not_entailment", "name") == "not entailment"
    # an unseen name: "curated" falls back to "sentence"
    for name in ("card_arrival", "reverted_card_payment?", "Refund_not_showing_up"):
        words = name.replace("_", " ")
        assert default_label_text(name, "curated") == default_label_text(name, "sentence") == \
            f"The label of the text is {words}."
        assert default_label_text(name, "name") == words
    with pytest.raises(ValueError, match="label_template must be one of curated, sentence, name"):
        default_label_text("positive", "names")


@pytest.mark.parametrize("template", LABEL_TEMPLATES)
def test_classifier_builds_saves_and_adds_labels_with_its_template(minilm, tmp_path, template):
    """The config's texts follow the template (an explicit text wins), the template is saved, and a label added
    at inference without a text gets one of the same form; an adapter saved without the key loads as curated."""
    tok = minilm[1]
    base = tiny_base("encoder", tok)
    names = ["negative", "card_arrival"]
    clf = ltuning.Classifier("minilm-l6", "lt-prefix", label_names=names, base=base, tokenizer=tok,
                             label_texts={"card_arrival": "Where is my card?"}, label_template=template)
    m = clf.build(names)
    try:
        assert m.config.label_template == template
        assert m.config.label_texts == [default_label_text("negative", template), "Where is my card?"]
        m.add_labels(["exchange_rate"])
        assert m.config.label_texts[-1] == default_label_text("exchange_rate", template)
        m.save_pretrained(str(tmp_path))
    finally:
        ltuning.unpatch(m)
    r = ltuning.LTuningModel.from_pretrained(base, str(tmp_path), tok)
    try:
        assert r.config.label_template == template and r.config.label_texts == m.config.label_texts
    finally:
        ltuning.unpatch(r)
    old = ltuning.make_config("lt-prefix", label_names=names)
    d = old.to_dict()
    d.pop("label_template")  # an adapter saved before the option
    assert type(old).from_dict(d).label_template == "curated"


def test_bad_template_refused(minilm, tmp_path, sst2_dir, capsys):
    tok = minilm[1]
    base = tiny_base("encoder", tok)
    with pytest.raises(ValueError, match="label_template must be one of"):
        ltuning.patch(base, ltuning.make_config("lt-prefix", label_names=["a", "b"], label_template="word"), tok)
    with pytest.raises(ValueError, match="label_template"):  # not an option of a method without label texts
        ltuning.make_config("lora", label_names=["a", "b"], label_template="name")
    from ltuning.cli import main
    rc = main(["train", "--model", "minilm-l6", "--method", "lt-prefix", "--label-template", "word", "--data",
               sst2_dir, "--out", str(tmp_path / "w"), "--max-train-examples", "20", "--quiet"])
    err = [e for e in capsys.readouterr().err.strip().splitlines() if e.startswith("ltuning")]
    assert rc == 2 and len(err) == 1 and "label_template" in err[0] and "curated" in err[0], err
    assert not os.path.exists(tmp_path / "w" / "adapter_config.json")
