// A JDBC client of sluice's PostgreSQL endpoint, doing what DBeaver and other JDBC tools
// do: connect with pgjdbc, browse the catalog through DatabaseMetaData, run prepared
// statements with parameters and read each column as its Java type. Run by tests/pg.rs:
//   java -cp postgresql.jar SluiceJdbc.java HOST PORT
// Prints "ok" when every check holds; otherwise throws (and java exits non-zero).
import java.sql.*;
import java.time.OffsetDateTime;
import java.time.ZoneOffset;
import java.util.ArrayList;
import java.util.List;

public class SluiceJdbc {
    static void check(boolean holds, String what) {
        if (!holds) throw new AssertionError(what);
    }

    public static void main(String[] args) throws Exception {
        String url = "jdbc:postgresql://" + args[0] + ":" + args[1] + "/sluice";
        try (Connection conn = DriverManager.getConnection(url, "dbeaver", "")) {
            DatabaseMetaData meta = conn.getMetaData();
            check(meta.getDatabaseProductName().equals("PostgreSQL"), meta.getDatabaseProductName());

            // The navigator: tables of schema public, then the columns of one.
            List<String> tables = new ArrayList<>();
            try (ResultSet rs = meta.getTables(null, "public", "%", new String[] {"TABLE"})) {
                while (rs.next()) tables.add(rs.getString("TABLE_NAME"));
            }
            check(tables.contains("telemetry") && tables.contains("rejects"), "tables " + tables);
            List<String> columns = new ArrayList<>();
            try (ResultSet rs = meta.getColumns(null, "public", "telemetry", "%")) {
                while (rs.next()) columns.add(rs.getString("COLUMN_NAME") + ":" + rs.getInt("DATA_TYPE"));
            }
            check(columns.contains("device_id:" + Types.VARCHAR), "columns " + columns);
            check(columns.contains("temperature:" + Types.DOUBLE), "columns " + columns);
            check(columns.contains("ts:" + Types.TIMESTAMP), "columns " + columns);

            // A prepared statement with text, float and timestamp parameters.
            String sql = "SELECT device_id, ts, temperature, battery, firmware_version FROM telemetry "
                    + "WHERE device_id = ? AND temperature > ? AND ts >= ? ORDER BY ts";
            try (PreparedStatement st = conn.prepareStatement(sql)) {
                st.setString(1, "d1");
                st.setDouble(2, 21.0);
                st.setObject(3, OffsetDateTime.of(2024, 1, 15, 10, 0, 30, 0, ZoneOffset.UTC));
                int rows = 0;
                try (ResultSet rs = st.executeQuery()) {
                    ResultSetMetaData types = rs.getMetaData();
                    check(types.getColumnType(3) == Types.DOUBLE, "temperature type " + types.getColumnTypeName(3));
                    while (rs.next()) {
                        rows++;
                        if (rows == 1) {
                            check(rs.getString(1).equals("d1"), rs.getString(1));
                            OffsetDateTime ts = rs.getObject(2, OffsetDateTime.class);
                            check(ts.toInstant().toString().equals("2024-01-15T10:00:40Z"), "ts " + ts);
                            check(rs.getDouble(3) == 21.5, "temperature " + rs.getDouble(3));
                            check(rs.getDouble(4) == 89.0, "battery " + rs.getDouble(4));
                            check(rs.getString(5).equals("2.1.0"), rs.getString(5));
                        }
                    }
                }
                check(rows == 2, "rows " + rows);
                // The same statement again (pgjdbc switches to a named server-side statement
                // after a few runs) with other values.
                for (int i = 0; i < 6; i++) {
                    st.setString(1, "d2");
                    st.setDouble(2, 0.0);
                    st.setObject(3, OffsetDateTime.of(2024, 1, 15, 0, 0, 0, 0, ZoneOffset.UTC));
                    try (ResultSet rs = st.executeQuery()) {
                        check(rs.next() && rs.getDouble(3) == 30.0, "d2 run " + i);
                        check(!rs.next(), "one d2 row");
                    }
                }
            }

            // NULL, counts and an aggregate.
            try (Statement st = conn.createStatement();
                 ResultSet rs = st.executeQuery(
                         "SELECT count(*), avg(temperature), max(lat), CAST(NULL AS DOUBLE PRECISION) FROM telemetry")) {
                check(rs.next(), "a row");
                check(rs.getLong(1) == 4, "count " + rs.getLong(1));
                check(Math.abs(rs.getDouble(2) - 23.625) < 1e-9, "avg " + rs.getDouble(2));
                rs.getDouble(4);
                check(rs.wasNull(), "NULL");
            }

            // Writes are refused with SQLSTATE 25006 (read-only transaction).
            try (Statement st = conn.createStatement()) {
                st.execute("DROP TABLE telemetry");
                check(false, "DROP TABLE was accepted");
            } catch (SQLException e) {
                check("25006".equals(e.getSQLState()), "SQLSTATE " + e.getSQLState() + ": " + e.getMessage());
            }
        }
        System.out.println("ok");
    }
}
