"""The `data` stage: raw instruction/chat/preference/text sources → clean training files.

Modules: `sources` (reading files), `formats` (layouts → records), `clean` (normalisation,
filters, PII), `dedup` (exact, near-duplicate with rensa, contamination), `split` (splits and
mixing), `validate` (Great Expectations), `report` (report.json, metrics, UI summary),
`stage` (the `DataStage` that runs them in order).
"""
