"""The stamp data contract shared by every stage: columns, encode/decode (the npz codec), normalisation
and its robust statistics;
and the one reader of a Phase 4c dataset (``dataset``)."""
