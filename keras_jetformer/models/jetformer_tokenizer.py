"""The SentencePiece tokenizer of JetFormer models."""

import keras
from keras_hub.tokenizers import SentencePieceTokenizer

from keras_jetformer.models.jetformer_backbone import JetFormerBackbone

# Ids the model appends after the tokenizer's vocabulary. The tokenizer never
# produces them; the backbone inserts BOS and BOI itself and uses NOLABEL
# for classifier-free guidance.
NUM_MODEL_SPECIAL_TOKENS = 3


@keras.saving.register_keras_serializable(package="keras_jetformer")
class JetFormerTokenizer(SentencePieceTokenizer):
    """SentencePiece tokenizer for JetFormer.

    The SentencePiece model must define `<pad>` and `</s>` (end of text)
    pieces. The backbone's vocabulary is the tokenizer's plus three model
    ids (BOS, BOI, NOLABEL), so build a backbone with
    `vocabulary_size=tokenizer.vocabulary_size() + 3`, or use
    `model_vocabulary_size()`.

    Args:
        proto: either a `string` path to a SentencePiece proto file, or a
            `bytes` object with a serialized SentencePiece proto.

    Example:

    ```python
    proto = keras_jetformer.models.compute_jetformer_tokenizer_proto(
        ["a handwritten seven", "the digit 7"]
    )
    tokenizer = keras_jetformer.models.JetFormerTokenizer(proto=proto)
    tokenizer("the digit 7")
    ```
    """

    backbone_cls = JetFormerBackbone

    def __init__(self, proto, **kwargs):
        self._add_special_token("</s>", "end_token")
        self._add_special_token("<pad>", "pad_token")
        super().__init__(proto=proto, **kwargs)

    def model_vocabulary_size(self):
        """Vocabulary size of a matching backbone (tokenizer ids + 3)."""
        return self.vocabulary_size() + NUM_MODEL_SPECIAL_TOKENS



# Pieces that `keras_hub.tokenizers.compute_sentence_piece_proto` reserves:
# `<pad>`, `<unk>`, `<s>` and `</s>`.
NUM_RESERVED_PIECES = 4


def compute_jetformer_tokenizer_proto(
    sentences, vocabulary_size=None, model_type="word", lowercase=False
):
    """Train a SentencePiece model for `JetFormerTokenizer` on `sentences`.

    A thin wrapper of `keras_hub.tokenizers.compute_sentence_piece_proto`,
    which reserves `<pad>` (id 0), `<unk>`, `<s>` and `</s>` (the end token).

    Args:
        sentences: list of strings or a `tf.data.Dataset` of strings.
        vocabulary_size: int. Number of pieces, including the four reserved
            ones. Defaults to, for `model_type="word"`, the number of
            distinct words in `sentences` plus four.
        model_type: string. `"unigram"`, `"bpe"`, `"word"` or `"char"`.
            Defaults to `"word"`.
        lowercase: bool. Lowercase the text before training. Defaults to
            `False`.

    Returns:
        The serialized SentencePiece proto as `bytes`.
    """
    import tensorflow as tf
    from keras_hub.tokenizers import compute_sentence_piece_proto

    if isinstance(sentences, str):
        raise ValueError(
            "`sentences` must be a collection of strings, not one string. "
            f"Received: sentences={sentences!r}"
        )
    if not isinstance(sentences, tf.data.Dataset):
        sentences = [str(sentence) for sentence in sentences]
        if vocabulary_size is None and model_type == "word":
            words = {word for sentence in sentences for word in sentence.split()}
            vocabulary_size = len(words) + NUM_RESERVED_PIECES
        sentences = tf.data.Dataset.from_tensor_slices(sentences)
    if vocabulary_size is None:
        raise ValueError(
            "`vocabulary_size` is required unless `model_type` is \"word\" "
            "and `sentences` is a list. "
            f"Received: vocabulary_size=None, model_type={model_type!r}"
        )
    return compute_sentence_piece_proto(
        sentences,
        vocabulary_size=vocabulary_size,
        model_type=model_type,
        lowercase=lowercase,
    )
