-- The rejects table for the dataset explorer, filtered by $reason and $stage (NULL keeps every row).
-- Read by tasks.browse.explore.
SELECT item_id, item_kind, stage, reason, detail, source_path
FROM rejects
WHERE ($reason IS NULL OR reason = $reason)
  AND ($stage IS NULL OR stage = $stage)
ORDER BY stage, reason, item_id
