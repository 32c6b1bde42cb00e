-- What a run reports: every listed image and study is accounted for as stored or rejected.
SELECT
    (SELECT count(*) FROM metadata) AS images_listed,
    (SELECT count(*) FROM images) AS images_ingested,
    (SELECT count(*) FROM rejects WHERE item_kind = 'image') AS images_rejected,
    (SELECT count(DISTINCT study_id) FROM metadata) AS studies_listed,
    (SELECT count(*) FROM reports) AS reports_parsed,
    (SELECT count(*) FROM rejects WHERE item_kind = 'report') AS reports_rejected,
    (SELECT count(*) FROM rejects WHERE item_kind = 'csv_row') AS csv_rows_rejected,
    (SELECT count(*) FROM rejects WHERE item_kind = 'file') AS files_rejected
