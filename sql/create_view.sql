-- One view over the Parquet parts of a table; {name} and {files} are filled in by tasks.catalog.
-- union_by_name lets parts written by older code versions (a column added later) still be read together.
CREATE OR REPLACE VIEW "{name}" AS SELECT * FROM read_parquet('{files}', union_by_name = true)
