"""Where inputs come from: models, SAEs and texts (`sources`), the Hub (`hub`), multiple-choice sets (`mcq`),
token rows (`rows`) and the files of a DSG folder (`records`). Imports the runtime only."""
