"""The stamp data contract shared by every stage: columns, encode/decode (the npz codec), normalisation
and its robust statistics."""
