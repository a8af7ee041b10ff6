"""The SentencePiece tokenizer of JetFormer models."""

from keras_hub.tokenizers import SentencePieceTokenizer

from keras_jetformer.models.jetformer_backbone import JetFormerBackbone

# Ids the model appends after the tokenizer's vocabulary. The tokenizer never
# produces them; the backbone inserts BOS and BOI itself and uses NOLABEL
# for classifier-free guidance.
NUM_MODEL_SPECIAL_TOKENS = 3


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
    import io
    import keras_hub

    bytes_io = io.BytesIO()
    keras_hub.tokenizers.compute_sentence_piece_proto(
        ["a handwritten seven", "the digit 7"] * 10,
        vocabulary_size=20,
        proto_output_file=bytes_io,
        model_type="WORD",
        pad_id=0,
        eos_id=1,
        unk_id=2,
        bos_id=-1,
        pad_piece="<pad>",
        eos_piece="</s>",
        unk_piece="<unk>",
    )
    tokenizer = keras_jetformer.models.JetFormerTokenizer(
        proto=bytes_io.getvalue()
    )
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
