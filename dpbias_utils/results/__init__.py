"""Stage 05: the study's tables (`tables`), figures drawn only from them (`figures`), every claim
judged by one rule (`claims`, on the statistics of `inference`) and the findings text (`findings`).

The names notebook 05 and the stage adapters use are re-exported here.
"""
from . import sections
from .figures import (fig_association_vs_perplexity, fig_bias_vs_epsilon, fig_bias_vs_mixing_ratio, fig_claims_forest,
                      fig_gradnorm_gap, fig_learned_association, fig_likelihood_bias_vs_epsilon, fig_perplexity,
                      fig_table1, figure_list, fresh_figures_dir)
from .findings import (claims_display, findings_markdown, markdown_to_html, privacy_table, study_claims,
                       verdict_summary, write_findings)
from .regimes import regime_cells, regime_figures, regime_map, regime_pull, regime_table, regime_trajectories
from .sweep import cda_vs_global, fig_amplification_heatmap, fig_method_bars, fig_misalignment
from .tables import (ITEM_COLUMNS, PAPER_TABLE1, PRIVACY_COLUMNS, RESULT_COLUMNS, collect_tables, load_tables,
                     seed_summary, study_overview, table1, write_tables)

__all__ = [
    "fig_association_vs_perplexity", "fig_bias_vs_epsilon", "fig_bias_vs_mixing_ratio", "fig_gradnorm_gap",
    "fig_learned_association", "fig_perplexity", "fig_claims_forest", "fig_likelihood_bias_vs_epsilon", "sections", "fresh_figures_dir", "fig_table1", "figure_list", "claims_display",
    "findings_markdown", "markdown_to_html", "privacy_table", "study_claims", "verdict_summary", "write_findings",
    "ITEM_COLUMNS", "PAPER_TABLE1", "PRIVACY_COLUMNS", "RESULT_COLUMNS", "collect_tables", "load_tables",
    "seed_summary", "study_overview", "table1", "write_tables",
    "cda_vs_global", "fig_amplification_heatmap", "fig_method_bars", "fig_misalignment",
    "regime_cells", "regime_figures", "regime_map", "regime_pull", "regime_table", "regime_trajectories",
]
