//! The PostgreSQL wire protocol (psql, Grafana's PostgreSQL data source, JDBC, psycopg)
//! over the same DataFusion catalog as `/query`, through `datafusion-postgres`: simple and
//! extended query protocol, parameters, `pg_catalog` and `information_schema`. Read-only:
//! every statement other than a query, `EXPLAIN`, `SHOW`, a session `SET` and transaction
//! or cursor control is refused, as on the HTTP endpoint.

use std::fmt::Debug;
use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context;
use async_trait::async_trait;
use datafusion::common::ParamValues;
use datafusion::logical_expr::LogicalPlan;
use datafusion::prelude::SessionContext;
use datafusion::sql::sqlparser::ast::Statement;
use datafusion_postgres::datafusion_pg_catalog::pg_catalog::context::EmptyContextProvider;
use datafusion_postgres::datafusion_pg_catalog::pg_catalog::setup_pg_catalog;
use datafusion_postgres::hooks::HookClient;
use datafusion_postgres::hooks::cursor::CursorStatementHook;
use datafusion_postgres::hooks::set_show::SetShowHook;
use datafusion_postgres::hooks::transactions::TransactionStatementHook;
use datafusion_postgres::pgwire::api::auth::cleartext::CleartextPasswordAuthStartupHandler;
use datafusion_postgres::pgwire::api::auth::noop::NoopStartupHandler;
use datafusion_postgres::pgwire::api::auth::sasl::SASLAuthStartupHandler;
use datafusion_postgres::pgwire::api::auth::sasl::scram::{ScramAuth, gen_salted_password};
use datafusion_postgres::pgwire::api::auth::{
    AuthSource, DefaultServerParameterProvider, LoginInfo, Password, StartupHandler,
};
use datafusion_postgres::pgwire::api::portal::Portal;
use datafusion_postgres::pgwire::api::query::{ExtendedQueryHandler, SimpleQueryHandler};
use datafusion_postgres::pgwire::api::results::{
    DescribePortalResponse, DescribeStatementResponse, Response,
};
use datafusion_postgres::pgwire::api::stmt::StoredStatement;
use datafusion_postgres::pgwire::api::store::PortalStore;
use datafusion_postgres::pgwire::api::{
    ClientInfo, ClientPortalStore, ErrorHandler, PgWireServerHandlers,
};
use datafusion_postgres::pgwire::error::{ErrorInfo, PgWireError, PgWireResult};
use datafusion_postgres::pgwire::messages::{PgWireBackendMessage, PgWireFrontendMessage};
use datafusion_postgres::{DfSessionService, QueryHook};
use futures::Sink;
use sluice_storage::{LimitExceeded, Storage, Ticket};

use crate::config::PgPasswordAuth;

mod compat;

/// The catalog name sluice's tables live in (`sluice.public.telemetry`).
const CATALOG: &str = "sluice";

pub(crate) struct PgServer {
    addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl PgServer {
    /// Binds `addr` (port 0 allowed) and serves on `runtime`. With `password`, clients
    /// must give it (any user name), by SCRAM-SHA-256 or in clear text as `auth` says.
    pub(crate) fn start(
        runtime: &tokio::runtime::Handle,
        addr: SocketAddr,
        storage: &Storage,
        password: Option<String>,
        auth: PgPasswordAuth,
    ) -> anyhow::Result<PgServer> {
        let ctx = Arc::new(storage.session().clone());
        setup_pg_catalog(&ctx, CATALOG, EmptyContextProvider)
            .map_err(|e| anyhow::anyhow!("registering pg_catalog: {e}"))?;
        compat::register(&ctx);
        let hooks: Vec<Arc<dyn QueryHook>> = vec![
            Arc::new(ReadOnly),
            Arc::new(compat::InformationSchemaTypes),
            Arc::new(CursorStatementHook),
            Arc::new(SetShowHook),
            Arc::new(TransactionStatementHook),
        ];
        let handlers = Arc::new(Handlers {
            service: Arc::new(Limited {
                service: Arc::new(DfSessionService::new_with_hooks(ctx, hooks)),
                storage: storage.clone(),
            }),
            login: match (password, auth) {
                (Some(password), PgPasswordAuth::ScramSha256) => {
                    Login::Scram(Arc::new(Salted::new(&password)))
                }
                (Some(password), PgPasswordAuth::Cleartext) => {
                    Login::Cleartext(Arc::new(CleartextPasswordAuthStartupHandler::new(
                        Secret(password),
                        DefaultServerParameterProvider::default(),
                    )))
                }
                (None, _) => Login::Open,
            },
        });
        let listener = std::net::TcpListener::bind(addr)
            .with_context(|| format!("binding the PostgreSQL listener {addr}"))?;
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        let listener = {
            let _entered = runtime.enter();
            tokio::net::TcpListener::from_std(listener)?
        };
        let task = runtime.spawn(async move {
            loop {
                match listener.accept().await {
                    Ok((socket, peer)) => {
                        let handlers = handlers.clone();
                        tokio::spawn(async move {
                            let served = datafusion_postgres::pgwire::tokio::process_socket(
                                socket, None, handlers,
                            )
                            .await;
                            if let Err(e) = served {
                                tracing::debug!(%peer, error = %e, "PostgreSQL connection ended");
                            }
                        });
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "PostgreSQL listener: accept failed");
                        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    }
                }
            }
        });
        tracing::info!(%addr, "PostgreSQL ready");
        Ok(PgServer { addr, task })
    }

    pub(crate) fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Stops accepting connections (open ones end with the process).
    pub(crate) fn stop(self) {
        self.task.abort();
    }
}

struct Handlers {
    service: Arc<Limited>,
    login: Login,
}

/// How clients log in.
enum Login {
    Open,
    Cleartext(Arc<CleartextPasswordAuthStartupHandler<Secret, DefaultServerParameterProvider>>),
    /// A SCRAM exchange has state of its own: a handler per connection.
    Scram(Arc<Salted>),
}

impl PgWireServerHandlers for Handlers {
    fn simple_query_handler(&self) -> Arc<impl SimpleQueryHandler> {
        self.service.clone()
    }

    fn extended_query_handler(&self) -> Arc<impl ExtendedQueryHandler> {
        self.service.clone()
    }

    /// Called once per connection.
    fn startup_handler(&self) -> Arc<impl StartupHandler> {
        Arc::new(match &self.login {
            Login::Open => Startup::Open(Open),
            Login::Cleartext(handler) => Startup::Cleartext(handler.clone()),
            Login::Scram(salted) => {
                let mut scram = ScramAuth::new(salted.clone());
                scram.set_iterations(SCRAM_ITERATIONS);
                Startup::Scram(Box::new(
                    SASLAuthStartupHandler::new(
                        Arc::new(DefaultServerParameterProvider::default()),
                    )
                    .with_scram(scram),
                ))
            }
        })
    }

    fn error_handler(&self) -> Arc<impl ErrorHandler> {
        Arc::new(LimitCodes)
    }
}

/// DataFusion's handlers within `[query]`'s limits, as `/query` is: each statement (or
/// simple-query string) waits for a place among the running queries, is planned within
/// its time, and its rows are streamed within its time and `max_result_bytes` (of the
/// encoded rows); the place is given back when its rows are sent or its portal closed.
struct Limited {
    service: Arc<DfSessionService>,
    storage: Storage,
}

/// A limit as PostgreSQL says it: 53300 too_many_connections (no place in time), 57014
/// query_canceled (time), 54000 program_limit_exceeded (result size).
fn limit_error(limit: LimitExceeded) -> PgWireError {
    let code = match limit {
        LimitExceeded::Busy(_) => "53300",
        LimitExceeded::Timeout(_) => "57014",
        LimitExceeded::ResultTooLarge(_) => "54000",
    };
    PgWireError::UserError(Box::new(ErrorInfo::new(
        "ERROR".into(),
        code.into(),
        limit.to_string(),
    )))
}

/// `response`'s rows within `ticket`'s limits.
fn guarded(ticket: &Arc<Ticket>, response: Response) -> Response {
    match response {
        Response::Query(mut query) => {
            let rows = std::mem::replace(&mut query.data_rows, Box::pin(futures::stream::empty()));
            query.data_rows = Box::pin(ticket.clone().guard(
                rows,
                |row: &datafusion_postgres::pgwire::messages::data::DataRow| row.data.len(),
                limit_error,
            ));
            Response::Query(query)
        }
        other => other,
    }
}

impl Limited {
    async fn admit(&self) -> PgWireResult<Arc<Ticket>> {
        let ticket = self
            .storage
            .admission()
            .admit()
            .await
            .map_err(limit_error)?;
        Ok(Arc::new(ticket))
    }
}

#[async_trait]
impl SimpleQueryHandler for Limited {
    async fn do_query<C>(&self, client: &mut C, query: &str) -> PgWireResult<Vec<Response>>
    where
        C: ClientInfo + ClientPortalStore + Sink<PgWireBackendMessage> + Unpin + Send + Sync,
        C::PortalStore: PortalStore,
        C::Error: Debug,
        PgWireError: From<<C as Sink<PgWireBackendMessage>>::Error>,
    {
        let ticket = self.admit().await?;
        let responses = ticket
            .within(
                SimpleQueryHandler::do_query(&*self.service, client, query),
                limit_error,
            )
            .await?;
        Ok(responses.into_iter().map(|r| guarded(&ticket, r)).collect())
    }
}

#[async_trait]
impl ExtendedQueryHandler for Limited {
    type Statement = <DfSessionService as ExtendedQueryHandler>::Statement;
    type QueryParser = <DfSessionService as ExtendedQueryHandler>::QueryParser;

    fn query_parser(&self) -> Arc<Self::QueryParser> {
        self.service.query_parser()
    }

    async fn do_describe_statement<C>(
        &self,
        client: &mut C,
        target: &StoredStatement<Self::Statement>,
    ) -> PgWireResult<DescribeStatementResponse>
    where
        C: ClientInfo + ClientPortalStore + Sink<PgWireBackendMessage> + Unpin + Send + Sync,
        C::PortalStore: PortalStore<Statement = Self::Statement>,
        C::Error: Debug,
        PgWireError: From<<C as Sink<PgWireBackendMessage>>::Error>,
    {
        self.service.do_describe_statement(client, target).await
    }

    async fn do_describe_portal<C>(
        &self,
        client: &mut C,
        target: &Portal<Self::Statement>,
    ) -> PgWireResult<DescribePortalResponse>
    where
        C: ClientInfo + ClientPortalStore + Sink<PgWireBackendMessage> + Unpin + Send + Sync,
        C::PortalStore: PortalStore<Statement = Self::Statement>,
        C::Error: Debug,
        PgWireError: From<<C as Sink<PgWireBackendMessage>>::Error>,
    {
        self.service.do_describe_portal(client, target).await
    }

    async fn do_query<C>(
        &self,
        client: &mut C,
        portal: &Portal<Self::Statement>,
        max_rows: usize,
    ) -> PgWireResult<Response>
    where
        C: ClientInfo + ClientPortalStore + Sink<PgWireBackendMessage> + Unpin + Send + Sync,
        C::PortalStore: PortalStore<Statement = Self::Statement>,
        C::Error: Debug,
        PgWireError: From<<C as Sink<PgWireBackendMessage>>::Error>,
    {
        let ticket = self.admit().await?;
        let response = ticket
            .within(
                ExtendedQueryHandler::do_query(&*self.service, client, portal, max_rows),
                limit_error,
            )
            .await?;
        Ok(guarded(&ticket, response))
    }
}

/// DataFusion's memory pool refusing a query becomes SQLSTATE 53200 (out_of_memory)
/// instead of an internal error.
struct LimitCodes;

impl ErrorHandler for LimitCodes {
    fn on_error<C>(&self, _client: &C, error: &mut PgWireError)
    where
        C: ClientInfo,
    {
        let exhausted = match &*error {
            PgWireError::ApiError(e) => e
                .downcast_ref::<datafusion::error::DataFusionError>()
                .and_then(|e| match e.find_root() {
                    datafusion::error::DataFusionError::ResourcesExhausted(why) => {
                        Some(why.clone())
                    }
                    _ => None,
                }),
            _ => None,
        };
        if let Some(why) = exhausted {
            *error = PgWireError::UserError(Box::new(ErrorInfo::new(
                "ERROR".into(),
                "53200".into(),
                format!("the query went over its memory (query.max_memory_bytes): {why}"),
            )));
        }
        tracing::debug!(%error, "PostgreSQL error sent");
    }
}

/// No authentication.
struct Open;

impl NoopStartupHandler for Open {}

/// The configured password, whatever the user name.
#[derive(Debug)]
struct Secret(String);

#[async_trait]
impl AuthSource for Secret {
    async fn get_password(&self, _login: &LoginInfo) -> PgWireResult<Password> {
        Ok(Password::new(None, self.0.as_bytes().to_vec()))
    }
}

/// SCRAM's iterations of PBKDF2 (PostgreSQL's default).
const SCRAM_ITERATIONS: usize = 4096;

/// The password as SCRAM-SHA-256 keeps it (RFC 5802's SaltedPassword): salted and hashed
/// once at start with a salt of this process's, so a login costs no PBKDF2 of its own.
#[derive(Debug)]
struct Salted {
    salt: Vec<u8>,
    salted: Vec<u8>,
}

impl Salted {
    fn new(password: &str) -> Salted {
        let salt = uuid::Uuid::new_v4().as_bytes().to_vec();
        let salted = gen_salted_password(password, &salt, SCRAM_ITERATIONS);
        Salted { salt, salted }
    }
}

#[async_trait]
impl AuthSource for Salted {
    async fn get_password(&self, _login: &LoginInfo) -> PgWireResult<Password> {
        Ok(Password::new(Some(self.salt.clone()), self.salted.clone()))
    }
}

enum Startup {
    Open(Open),
    Cleartext(Arc<CleartextPasswordAuthStartupHandler<Secret, DefaultServerParameterProvider>>),
    Scram(Box<SASLAuthStartupHandler<DefaultServerParameterProvider>>),
}

#[async_trait]
impl StartupHandler for Startup {
    async fn on_startup<C>(
        &self,
        client: &mut C,
        message: PgWireFrontendMessage,
    ) -> PgWireResult<()>
    where
        C: ClientInfo + Sink<PgWireBackendMessage> + Unpin + Send + Sync,
        C::Error: Debug,
        PgWireError: From<<C as Sink<PgWireBackendMessage>>::Error>,
    {
        match self {
            Startup::Open(open) => open.on_startup(client, message).await,
            Startup::Cleartext(password) => password.on_startup(client, message).await,
            Startup::Scram(scram) => scram.on_startup(client, message).await,
        }
    }
}

/// The refusal of `statement` as a PostgreSQL error (SQLSTATE 25006,
/// read_only_sql_transaction), or `None` if it may run.
fn refuse<T>(statement: &Statement) -> Option<PgWireResult<T>> {
    sluice_storage::refusal(statement, sluice_storage::Sessions::PerClient).map(|message| {
        Err(PgWireError::UserError(Box::new(ErrorInfo::new(
            "ERROR".into(),
            "25006".into(),
            message,
        ))))
    })
}

/// Refuses every statement that could write, or read files outside sluice's tables.
struct ReadOnly;

#[async_trait]
impl QueryHook for ReadOnly {
    async fn handle_simple_query(
        &self,
        statement: &Statement,
        _ctx: &SessionContext,
        _client: &mut dyn HookClient,
    ) -> Option<PgWireResult<Response>> {
        refuse(statement)
    }

    async fn handle_extended_parse_query(
        &self,
        statement: &Statement,
        _ctx: &SessionContext,
        _client: &(dyn ClientInfo + Send + Sync),
    ) -> Option<PgWireResult<LogicalPlan>> {
        refuse(statement)
    }

    async fn handle_extended_query(
        &self,
        statement: &Statement,
        _plan: &LogicalPlan,
        _params: &ParamValues,
        _ctx: &SessionContext,
        _client: &mut dyn HookClient,
    ) -> Option<PgWireResult<Response>> {
        refuse(statement)
    }
}
