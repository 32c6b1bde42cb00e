-- label_value(v, policy): one CheXpert/NegBio label as the classifier sees it.
-- 1 positive and 0 negative stay; not mentioned (NULL) is negative, 0; uncertain (-1) follows the policy:
-- 'zeros' -> 0, 'ones' -> 1, 'ignore' -> NULL (masked out of the loss). An unknown policy is an error, never a guess.
CREATE OR REPLACE TEMP MACRO label_value(v, policy) AS CAST(
    CASE
        WHEN v = -1 THEN (CASE policy
                              WHEN 'zeros' THEN 0
                              WHEN 'ones' THEN 1
                              WHEN 'ignore' THEN NULL
                              ELSE error('unknown uncertainty policy: ' || policy)
                          END)
        ELSE coalesce(v, 0)
    END AS FLOAT)
