"""Tables and the HTML report, built from run folders alone (imports only `core`)."""
