# PostgreSQL 15 on RDS: private, multi-AZ, encrypted with the module's KMS
# key, TLS required, automated backups with point-in-time recovery
# (docs/OPERATIONS.md). The master password is generated and rotated by RDS in
# Secrets Manager; it never appears in Terraform state.

resource "aws_security_group" "database" {
  name        = "${var.name}-database"
  description = "PostgreSQL: reachable from the aggregator tasks only"
  vpc_id      = aws_vpc.main.id

  tags = merge(local.tags, { Name = "${var.name}-database" })
}

resource "aws_security_group_rule" "database_from_aggregator" {
  security_group_id        = aws_security_group.database.id
  description              = "PostgreSQL from the aggregator tasks"
  type                     = "ingress"
  protocol                 = "tcp"
  from_port                = 5432
  to_port                  = 5432
  source_security_group_id = aws_security_group.aggregator.id
}

resource "aws_db_subnet_group" "main" {
  name        = "${var.name}-database"
  description = "DCS ${var.name}: the private subnets"
  subnet_ids  = aws_subnet.private[*].id

  tags = local.tags
}

resource "aws_db_parameter_group" "main" {
  name        = "${var.name}-postgres15"
  family      = "postgres15"
  description = "DCS ${var.name}: TLS required, slow and DDL statements logged"

  parameter {
    name  = "rds.force_ssl"
    value = "1"
  }

  # Query logging: statements slower than 1 s and every schema change.
  parameter {
    name  = "log_min_duration_statement"
    value = "1000"
  }

  parameter {
    name  = "log_statement"
    value = "ddl"
  }

  parameter {
    name  = "log_connections"
    value = "1"
  }

  parameter {
    name  = "log_disconnections"
    value = "1"
  }

  tags = local.tags
}

# RDS writes its logs here; creating the groups first gives them the KMS key
# and the retention.
resource "aws_cloudwatch_log_group" "database" {
  for_each = toset(["postgresql", "upgrade"])

  name              = "/aws/rds/instance/${var.name}/${each.value}"
  retention_in_days = var.log_retention_days
  kms_key_id        = aws_kms_key.main.arn

  tags = local.tags
}

resource "aws_iam_role" "rds_monitoring" {
  name = "${var.name}-rds-monitoring"

  assume_role_policy = jsonencode({
    Version = "2012-10-17"
    Statement = [{
      Effect    = "Allow"
      Principal = { Service = "monitoring.rds.amazonaws.com" }
      Action    = "sts:AssumeRole"
    }]
  })

  tags = local.tags
}

resource "aws_iam_role_policy_attachment" "rds_monitoring" {
  role       = aws_iam_role.rds_monitoring.name
  policy_arn = "arn:${local.partition}:iam::aws:policy/service-role/AmazonRDSEnhancedMonitoringRole"
}

resource "aws_db_instance" "main" {
  identifier     = var.name
  engine         = "postgres"
  engine_version = "15"
  instance_class = var.db_instance_class

  db_name                       = "dcs"
  username                      = "dcs_admin"
  manage_master_user_password   = true
  master_user_secret_kms_key_id = aws_kms_key.main.arn

  allocated_storage     = var.db_allocated_storage
  max_allocated_storage = var.db_max_allocated_storage
  storage_type          = "gp3"
  storage_encrypted     = true
  kms_key_id            = aws_kms_key.main.arn

  multi_az               = true
  db_subnet_group_name   = aws_db_subnet_group.main.name
  vpc_security_group_ids = [aws_security_group.database.id]
  publicly_accessible    = false
  parameter_group_name   = aws_db_parameter_group.main.name

  # Automated backups are what point-in-time recovery restores from.
  backup_retention_period   = var.db_backup_retention_days
  backup_window             = "02:00-03:00"
  maintenance_window        = "sun:03:30-sun:04:30"
  copy_tags_to_snapshot     = true
  delete_automated_backups  = false
  deletion_protection       = var.deletion_protection
  skip_final_snapshot       = false
  final_snapshot_identifier = "${var.name}-final"

  auto_minor_version_upgrade          = true
  allow_major_version_upgrade         = false
  iam_database_authentication_enabled = true

  enabled_cloudwatch_logs_exports       = ["postgresql", "upgrade"]
  monitoring_interval                   = 60
  monitoring_role_arn                   = aws_iam_role.rds_monitoring.arn
  performance_insights_enabled          = true
  performance_insights_kms_key_id       = aws_kms_key.main.arn
  performance_insights_retention_period = 7

  tags = local.tags

  depends_on = [aws_cloudwatch_log_group.database]
}

# --- Secrets the aggregator tasks read -------------------------------------------
#
# Terraform creates the secrets but never their values, so no credential or
# private key is ever in Terraform state. Put the values in after the first
# apply (docs/DEPLOYMENT.md, "AWS"):
#   database_url:       postgres://dcs_app:PASSWORD@HOST:5432/dcs?sslmode=require
#                       (the application role: INSERT/SELECT, no DDL)
#   database_owner_url: postgres://dcs_owner:PASSWORD@HOST:5432/dcs?sslmode=require
#                       (owns the schema; used only by the migrate task)
#   tls:                {"ca": "<ca.pem>", "cert": "<server.pem>", "key": "<server-key.pem>"}

resource "aws_secretsmanager_secret" "database_url" {
  #checkov:skip=CKV2_AWS_57:The URL holds the password of the application role, which an operator rotates together with the role (docs/OPERATIONS.md); a Lambda rotator for a composed URL is not worth its attack surface here.
  name        = "${var.name}/aggregator/database-url"
  description = "DCS ${var.name}: the aggregator's PostgreSQL URL (role dcs_app, sslmode=require)"
  kms_key_id  = aws_kms_key.main.arn

  recovery_window_in_days = 30

  tags = local.tags
}

resource "aws_secretsmanager_secret" "database_owner_url" {
  #checkov:skip=CKV2_AWS_57:The URL holds the password of the schema owner, used only by the one-off migrate task; an operator rotates it with the role (docs/OPERATIONS.md), a Lambda rotator for a composed URL is not worth its attack surface here.
  name        = "${var.name}/aggregator/database-owner-url"
  description = "DCS ${var.name}: PostgreSQL URL of the schema owner, for migrations only (sslmode=require)"
  kms_key_id  = aws_kms_key.main.arn

  recovery_window_in_days = 30

  tags = local.tags
}

resource "aws_secretsmanager_secret" "tls" {
  #checkov:skip=CKV2_AWS_57:A certificate and key pair issued by the DCS CA (dcs-certs); it is replaced by re-issuing the certificate (docs/DEPLOYMENT.md, "Certificate rotation"), which Secrets Manager rotation cannot do.
  name        = "${var.name}/aggregator/tls"
  description = "DCS ${var.name}: the aggregator's server certificate, key and the agents' CA (JSON: ca, cert, key)"
  kms_key_id  = aws_kms_key.main.arn

  recovery_window_in_days = 30

  tags = local.tags
}
