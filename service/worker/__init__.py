"""Workers: pull jobs, batch them per model and processing shape, run the model, reply. No HTTP here."""
