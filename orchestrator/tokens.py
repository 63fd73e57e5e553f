"""Token conventions every part shares (data, SFT, the loss, export, serving): the text of the
end-of-document token, and the target value the loss ignores."""

EOS = "<|endoftext|>"
IGNORE_INDEX = -100  # torch's cross_entropy default
