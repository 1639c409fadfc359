//! The one read-only rule of every SQL endpoint (HTTP `/query`, `sluice sql`, the
//! PostgreSQL wire protocol): a statement allow-list checked on the parsed statement,
//! before anything is planned. What is not on the list is refused, so a statement kind
//! DataFusion learns later is refused until someone decides otherwise.

use std::ops::ControlFlow;

use datafusion::sql::parser::Statement as DfStatement;
use datafusion::sql::sqlparser::ast::{Query, Set, SetExpr, Statement, Visit, Visitor};

/// The start of every refusal's message.
pub const READ_ONLY: &str = "sluice's SQL endpoints are read-only";

/// Whether the endpoint keeps a session per client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sessions {
    /// Each client has its own session (PostgreSQL): `SET` of a client setting,
    /// transactions and cursors are the client's own.
    PerClient,
    /// One context for everyone (HTTP, `sluice sql`): `SET` would change every client's
    /// settings, so it is refused, and so are transactions and cursors.
    Shared,
}

/// What may run, for the refusal's message.
fn allowed(sessions: Sessions) -> &'static str {
    match sessions {
        Sessions::PerClient => "queries, EXPLAIN, SHOW and session SET only",
        Sessions::Shared => "queries, EXPLAIN and SHOW only",
    }
}

/// The settings the PostgreSQL endpoint keeps per client (datafusion-postgres's SET hook
/// handles exactly these, written unquoted; any other name would reach DataFusion's
/// context, which every client shares).
const CLIENT_SETTINGS: [&str; 7] = [
    "statement_timeout",
    "datestyle",
    "bytea_output",
    "intervalstyle",
    "application_name",
    "extra_float_digits",
    "search_path",
];

/// Finds a `SELECT … INTO` (it creates a table) anywhere in a statement: nested
/// queries, subqueries, CTEs, set operations.
struct SelectInto;

impl Visitor for SelectInto {
    type Break = ();

    fn pre_visit_query(&mut self, query: &Query) -> ControlFlow<()> {
        fn into(body: &SetExpr) -> bool {
            match body {
                SetExpr::Select(select) => select.into.is_some(),
                SetExpr::SetOperation { left, right, .. } => into(left) || into(right),
                _ => false,
            }
        }
        if into(&query.body) {
            ControlFlow::Break(())
        } else {
            ControlFlow::Continue(())
        }
    }
}

/// Why `statement` is refused on an endpoint with `sessions`, or `None` if it may run.
pub fn refusal(statement: &Statement, sessions: Sessions) -> Option<String> {
    let per_client = sessions == Sessions::PerClient;
    let selects_into = statement.visit(&mut SelectInto).is_break();
    let allowed_here = !selects_into
        && match statement {
            Statement::Query(_) => true,
            // EXPLAIN ANALYZE runs its statement.
            Statement::Explain { statement, .. } => return refusal(statement, sessions),
            // A cursor runs its query.
            Statement::Declare { stmts } => {
                per_client
                    && stmts.iter().all(|d| {
                        d.for_query.as_ref().is_none_or(|q| {
                            refusal(&Statement::Query(q.clone()), sessions).is_none()
                        })
                    })
            }
            Statement::ExplainTable { .. }
            | Statement::ShowVariable { .. }
            | Statement::ShowVariables { .. }
            | Statement::ShowTables { .. }
            | Statement::ShowColumns { .. }
            | Statement::ShowCatalogs { .. }
            | Statement::ShowSchemas { .. } => true,
            Statement::StartTransaction { .. }
            | Statement::Commit { .. }
            | Statement::Rollback { .. }
            | Statement::Fetch { .. }
            | Statement::Close { .. }
            | Statement::Deallocate { .. }
            | Statement::Discard { .. } => per_client,
            // Only a client's own settings: anything else would change DataFusion's
            // context, shared by every client of this server.
            Statement::Set(Set::SingleAssignment {
                scope: None,
                hivevar: false,
                variable,
                ..
            }) => {
                per_client
                    && CLIENT_SETTINGS.contains(&variable.to_string().to_lowercase().as_str())
            }
            Statement::Set(Set::SingleAssignment { .. }) => false,
            Statement::Set(_) => per_client,
            _ => false,
        };
    if allowed_here {
        return None;
    }
    let what = match statement {
        _ if selects_into => "SELECT … INTO (it creates a table)".to_owned(),
        Statement::Set(_) if per_client => "SET of a setting every client shares".to_owned(),
        _ => first_words(&statement.to_string()),
    };
    Some(format!(
        "{READ_ONLY}: {what} is not allowed ({})",
        allowed(sessions)
    ))
}

/// The same rule for DataFusion's statements (its extensions: `CREATE EXTERNAL TABLE`,
/// `COPY … TO`, `RESET` are refused; `EXPLAIN` is judged by what it explains).
pub fn refusal_df(statement: &DfStatement, sessions: Sessions) -> Option<String> {
    match statement {
        DfStatement::Statement(statement) => refusal(statement, sessions),
        DfStatement::Explain(explain) => refusal_df(&explain.statement, sessions),
        other => Some(format!(
            "{READ_ONLY}: {} is not allowed ({})",
            first_words(&other.to_string()),
            allowed(sessions)
        )),
    }
}

fn first_words(text: &str) -> String {
    text.split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use datafusion::prelude::SessionContext;

    use super::*;

    fn parse(sql: &str) -> DfStatement {
        let state = SessionContext::new().state();
        let dialect = state.config().options().sql_parser.dialect;
        state.sql_to_statement(sql, &dialect).unwrap()
    }

    #[test]
    fn only_what_cannot_write_runs() {
        for sql in [
            "SELECT 1",
            "WITH t AS (SELECT 1 AS x) SELECT x FROM t",
            "EXPLAIN SELECT 1",
            "SHOW TABLES",
        ] {
            assert_eq!(refusal_df(&parse(sql), Sessions::Shared), None, "{sql}");
            assert_eq!(refusal_df(&parse(sql), Sessions::PerClient), None, "{sql}");
        }
        for sql in [
            "CREATE TABLE t (x INT)",
            "CREATE EXTERNAL TABLE t STORED AS PARQUET LOCATION '/etc'",
            "INSERT INTO telemetry VALUES (1)",
            "COPY (SELECT 1) TO '/tmp/x.csv'",
            "DROP TABLE telemetry",
            "SELECT 1 INTO t",
            "EXPLAIN ANALYZE INSERT INTO telemetry VALUES (1)",
            "EXPLAIN COPY (SELECT 1) TO '/tmp/x.csv'",
            "SET datafusion.execution.batch_size = 1",
            "SET \"datafusion.runtime.temp_directory\" = '/tmp'",
            "SET timezone = 'UTC'",
            "CREATE VIEW v AS SELECT 1",
            "(SELECT * INTO t FROM (SELECT 1 AS x) s)",
            "SELECT x FROM (SELECT 1 AS x) s WHERE x IN (SELECT 1 INTO u)",
            "WITH c AS (SELECT 1 INTO w) SELECT * FROM c",
        ] {
            for sessions in [Sessions::Shared, Sessions::PerClient] {
                let why = refusal_df(&parse(sql), sessions).unwrap_or_else(|| panic!("{sql}"));
                assert!(why.starts_with(READ_ONLY), "{why}");
            }
        }
        // A client's own setting: fine where the client has a session, not where
        // everybody shares one.
        let set = parse("SET application_name = 'grafana'");
        assert_eq!(refusal_df(&set, Sessions::PerClient), None);
        let tz = parse("SET TIME ZONE 'UTC'");
        assert_eq!(refusal_df(&tz, Sessions::PerClient), None);
        let cursor = parse("DECLARE c CURSOR FOR SELECT 1");
        assert_eq!(refusal_df(&cursor, Sessions::PerClient), None);
        let cursor = parse("DECLARE c CURSOR FOR SELECT 1 INTO t");
        assert!(refusal_df(&cursor, Sessions::PerClient).is_some());
        assert_eq!(
            refusal_df(&set, Sessions::Shared).unwrap(),
            "sluice's SQL endpoints are read-only: SET application_name = is not allowed (queries, EXPLAIN and SHOW only)"
        );
    }
}
