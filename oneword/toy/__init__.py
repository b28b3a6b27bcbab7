"""The toy world: procedurally drawn objects with discrete attributes (shape, fill colour, pattern,
outline colour) on coloured backgrounds, and captions that name only some of those attributes.

It makes textual inversion measurable on a CPU: every concept is known exactly, so whether a learned
word captured (or leaked) an attribute can be checked. See :mod:`oneword.toy.render` and
:mod:`oneword.toy.captions`.
"""
