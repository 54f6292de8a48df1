# The aggregator on ECS Fargate, in the private subnets, without public IPs.
#
# A task has two containers from the same image:
#   tls-init    writes the TLS material from Secrets Manager into a volume
#               only the task can see, then exits;
#   aggregator  `dcs-aggregator serve`, reading it from there (read-only).
# Both run as the image's non-root user on a read-only root file system.

locals {
  tls_dir = "/run/dcs/tls"
}

resource "aws_security_group" "aggregator" {
  name        = "${var.name}-aggregator"
  description = "Aggregator tasks: agents through the load balancer, admin port for health checks and Prometheus"
  vpc_id      = aws_vpc.main.id

  tags = merge(local.tags, { Name = "${var.name}-aggregator" })
}

resource "aws_security_group_rule" "aggregator_agents_in" {
  security_group_id        = aws_security_group.aggregator.id
  description              = "Agents (mutual TLS, passed through by the load balancer)"
  type                     = "ingress"
  protocol                 = "tcp"
  from_port                = 8443
  to_port                  = 8443
  source_security_group_id = aws_security_group.nlb.id
}

resource "aws_security_group_rule" "aggregator_health_in" {
  security_group_id        = aws_security_group.aggregator.id
  description              = "Load balancer health checks (GET /ready on the admin port)"
  type                     = "ingress"
  protocol                 = "tcp"
  from_port                = 9464
  to_port                  = 9464
  source_security_group_id = aws_security_group.nlb.id
}

resource "aws_security_group_rule" "aggregator_monitoring_in" {
  count = length(var.monitoring_cidrs) > 0 ? 1 : 0

  security_group_id = aws_security_group.aggregator.id
  description       = "Prometheus scraping /metrics on the admin port"
  type              = "ingress"
  protocol          = "tcp"
  from_port         = 9464
  to_port           = 9464
  cidr_blocks       = var.monitoring_cidrs
}

resource "aws_security_group_rule" "aggregator_database_out" {
  security_group_id        = aws_security_group.aggregator.id
  description              = "PostgreSQL"
  type                     = "egress"
  protocol                 = "tcp"
  from_port                = 5432
  to_port                  = 5432
  source_security_group_id = aws_security_group.database.id
}

resource "aws_security_group_rule" "aggregator_endpoints_out" {
  security_group_id        = aws_security_group.aggregator.id
  description              = "AWS service endpoints (ECR, CloudWatch Logs, Secrets Manager)"
  type                     = "egress"
  protocol                 = "tcp"
  from_port                = 443
  to_port                  = 443
  source_security_group_id = aws_security_group.endpoints.id
}

resource "aws_security_group_rule" "aggregator_s3_out" {
  security_group_id = aws_security_group.aggregator.id
  description       = "S3 through the gateway endpoint (ECR image layers)"
  type              = "egress"
  protocol          = "tcp"
  from_port         = 443
  to_port           = 443
  prefix_list_ids   = [aws_vpc_endpoint.s3.prefix_list_id]
}

resource "aws_cloudwatch_log_group" "aggregator" {
  name              = "/dcs/${var.name}/aggregator"
  retention_in_days = var.log_retention_days
  kms_key_id        = aws_kms_key.main.arn

  tags = local.tags
}

resource "aws_ecs_cluster" "main" {
  name = var.name

  setting {
    name  = "containerInsights"
    value = "enabled"
  }

  tags = local.tags
}

# --- IAM: the execution role (ECS itself) and the task role (the containers) ---

data "aws_iam_policy_document" "ecs_tasks_assume" {
  statement {
    actions = ["sts:AssumeRole"]

    principals {
      type        = "Service"
      identifiers = ["ecs-tasks.amazonaws.com"]
    }

    condition {
      test     = "StringEquals"
      variable = "aws:SourceAccount"
      values   = [local.account_id]
    }
  }
}

resource "aws_iam_role" "execution" {
  name               = "${var.name}-aggregator-execution"
  assume_role_policy = data.aws_iam_policy_document.ecs_tasks_assume.json

  tags = local.tags
}

resource "aws_iam_role_policy_attachment" "execution" {
  role       = aws_iam_role.execution.name
  policy_arn = "arn:${local.partition}:iam::aws:policy/service-role/AmazonECSTaskExecutionRolePolicy"
}

data "aws_iam_policy_document" "execution_secrets" {
  statement {
    sid     = "ReadAggregatorSecrets"
    actions = ["secretsmanager:GetSecretValue"]
    resources = [
      aws_secretsmanager_secret.database_url.arn,
      aws_secretsmanager_secret.database_owner_url.arn,
      aws_secretsmanager_secret.tls.arn,
    ]
  }

  statement {
    sid       = "DecryptAggregatorSecrets"
    actions   = ["kms:Decrypt"]
    resources = [aws_kms_key.main.arn]
  }
}

resource "aws_iam_role_policy" "execution_secrets" {
  name   = "read-aggregator-secrets"
  role   = aws_iam_role.execution.id
  policy = data.aws_iam_policy_document.execution_secrets.json
}

# The aggregator calls no AWS API: its task role has no permissions.
resource "aws_iam_role" "task" {
  name               = "${var.name}-aggregator-task"
  assume_role_policy = data.aws_iam_policy_document.ecs_tasks_assume.json

  tags = local.tags
}

# --- Task definition and service -------------------------------------------------

resource "aws_ecs_task_definition" "aggregator" {
  family                   = "${var.name}-aggregator"
  requires_compatibilities = ["FARGATE"]
  network_mode             = "awsvpc"
  cpu                      = var.aggregator_cpu
  memory                   = var.aggregator_memory
  execution_role_arn       = aws_iam_role.execution.arn
  task_role_arn            = aws_iam_role.task.arn

  runtime_platform {
    operating_system_family = "LINUX"
    cpu_architecture        = "X86_64"
  }

  # Task-scoped storage for the TLS material; it disappears with the task.
  volume {
    name = "tls"
  }

  container_definitions = jsonencode([
    {
      name                   = "tls-init"
      image                  = var.aggregator_image
      essential              = false
      user                   = "10001:10001"
      readonlyRootFilesystem = true
      privileged             = false
      entryPoint             = ["/bin/sh", "-c"]
      command = [join(" && ", [
        "umask 077",
        "printf '%s\\n' \"$DCS_TLS_CA\" > ${local.tls_dir}/ca.pem",
        "printf '%s\\n' \"$DCS_TLS_CERT\" > ${local.tls_dir}/server.pem",
        "printf '%s\\n' \"$DCS_TLS_KEY\" > ${local.tls_dir}/server-key.pem",
      ])]
      secrets = [
        { name = "DCS_TLS_CA", valueFrom = "${aws_secretsmanager_secret.tls.arn}:ca::" },
        { name = "DCS_TLS_CERT", valueFrom = "${aws_secretsmanager_secret.tls.arn}:cert::" },
        { name = "DCS_TLS_KEY", valueFrom = "${aws_secretsmanager_secret.tls.arn}:key::" },
      ]
      mountPoints = [{ sourceVolume = "tls", containerPath = local.tls_dir, readOnly = false }]
      logConfiguration = {
        logDriver = "awslogs"
        options = {
          awslogs-group         = aws_cloudwatch_log_group.aggregator.name
          awslogs-region        = local.region
          awslogs-stream-prefix = "tls-init"
        }
      }
    },
    {
      name                   = "aggregator"
      image                  = var.aggregator_image
      essential              = true
      user                   = "10001:10001"
      readonlyRootFilesystem = true
      privileged             = false
      command                = ["serve"]
      dependsOn              = [{ containerName = "tls-init", condition = "SUCCESS" }]
      portMappings = [
        { containerPort = 8443, protocol = "tcp" },
        { containerPort = 9464, protocol = "tcp" },
      ]
      environment = [
        { name = "DCS_AGG_LISTEN__ADDRESS", value = "0.0.0.0:8443" },
        { name = "DCS_AGG_ADMIN__ADDRESS", value = "0.0.0.0:9464" },
        { name = "DCS_AGG_TLS__CA", value = "${local.tls_dir}/ca.pem" },
        { name = "DCS_AGG_TLS__CERT", value = "${local.tls_dir}/server.pem" },
        { name = "DCS_AGG_TLS__KEY", value = "${local.tls_dir}/server-key.pem" },
        { name = "DCS_AGG_DATABASE__MAX_CONNECTIONS", value = tostring(var.aggregator_db_max_connections) },
        # Migrations are applied by the one-off migrate task (below) as the
        # schema owner before a deployment (docs/OPERATIONS.md, "Upgrades");
        # the service connects as dcs_app, which may not change the schema.
        { name = "DCS_AGG_DATABASE__MIGRATE_ON_START", value = "false" },
        # The NLB does not preserve client addresses for IP targets over TCP:
        # agent connections come from a few NLB addresses, so a per-address
        # cap here would cap the fleet.
        { name = "DCS_AGG_CONNECTIONS__MAX_CONNECTIONS_PER_ADDRESS", value = "0" },
      ]
      secrets = [
        { name = "DCS_AGG_DATABASE__URL", valueFrom = aws_secretsmanager_secret.database_url.arn },
      ]
      mountPoints = [{ sourceVolume = "tls", containerPath = local.tls_dir, readOnly = true }]
      healthCheck = {
        command     = ["CMD", "/usr/local/bin/dcs-healthcheck", "9464", "/health"]
        interval    = 15
        timeout     = 5
        retries     = 3
        startPeriod = 20
      }
      # SIGTERM drains: shutdown.drain_delay (5 s) with /ready failing, then
      # up to shutdown.grace (30 s) for requests in flight.
      stopTimeout = 40
      # One descriptor per agent connection; connections.max_connections is
      # 8192 per listener, far above the default soft limit of 1024.
      ulimits = [{ name = "nofile", softLimit = 65536, hardLimit = 65536 }]
      logConfiguration = {
        logDriver = "awslogs"
        options = {
          awslogs-group         = aws_cloudwatch_log_group.aggregator.name
          awslogs-region        = local.region
          awslogs-stream-prefix = "aggregator"
        }
      }
    },
  ])

  tags = local.tags
}

# `dcs-aggregator migrate` as the schema owner. Run it once before a
# deployment: aws ecs run-task --task-definition <migrate_task_definition_arn>
# with the aggregator's subnets and security group (docs/DEPLOYMENT.md).
resource "aws_ecs_task_definition" "migrate" {
  family                   = "${var.name}-migrate"
  requires_compatibilities = ["FARGATE"]
  network_mode             = "awsvpc"
  cpu                      = 256
  memory                   = 512
  execution_role_arn       = aws_iam_role.execution.arn
  task_role_arn            = aws_iam_role.task.arn

  runtime_platform {
    operating_system_family = "LINUX"
    cpu_architecture        = "X86_64"
  }

  container_definitions = jsonencode([
    {
      name                   = "migrate"
      image                  = var.aggregator_image
      essential              = true
      user                   = "10001:10001"
      readonlyRootFilesystem = true
      privileged             = false
      command                = ["migrate"]
      secrets = [
        { name = "DCS_AGG_DATABASE__URL", valueFrom = aws_secretsmanager_secret.database_owner_url.arn },
      ]
      logConfiguration = {
        logDriver = "awslogs"
        options = {
          awslogs-group         = aws_cloudwatch_log_group.aggregator.name
          awslogs-region        = local.region
          awslogs-stream-prefix = "migrate"
        }
      }
    },
  ])

  tags = local.tags
}

resource "aws_ecs_service" "aggregator" {
  name                              = "aggregator"
  cluster                           = aws_ecs_cluster.main.id
  task_definition                   = aws_ecs_task_definition.aggregator.arn
  desired_count                     = var.aggregator_desired_count
  launch_type                       = "FARGATE"
  platform_version                  = "LATEST"
  health_check_grace_period_seconds = 60
  propagate_tags                    = "SERVICE"
  enable_ecs_managed_tags           = true

  # Rolling deployments that keep full capacity and roll back by themselves
  # when the new tasks do not become healthy.
  deployment_minimum_healthy_percent = 100
  deployment_maximum_percent         = 200

  deployment_circuit_breaker {
    enable   = true
    rollback = true
  }

  network_configuration {
    subnets          = aws_subnet.private[*].id
    security_groups  = [aws_security_group.aggregator.id]
    assign_public_ip = false
  }

  load_balancer {
    target_group_arn = aws_lb_target_group.agents.arn
    container_name   = "aggregator"
    container_port   = 8443
  }

  lifecycle {
    ignore_changes = [desired_count] # owned by the autoscaling policy
  }

  tags = local.tags

  depends_on = [aws_lb_listener.agents]
}

resource "aws_appautoscaling_target" "aggregator" {
  service_namespace  = "ecs"
  resource_id        = "service/${aws_ecs_cluster.main.name}/${aws_ecs_service.aggregator.name}"
  scalable_dimension = "ecs:service:DesiredCount"
  min_capacity       = var.aggregator_desired_count
  max_capacity       = var.aggregator_max_count
}

resource "aws_appautoscaling_policy" "aggregator_cpu" {
  name               = "${var.name}-aggregator-cpu"
  policy_type        = "TargetTrackingScaling"
  service_namespace  = aws_appautoscaling_target.aggregator.service_namespace
  resource_id        = aws_appautoscaling_target.aggregator.resource_id
  scalable_dimension = aws_appautoscaling_target.aggregator.scalable_dimension

  target_tracking_scaling_policy_configuration {
    target_value       = 60
    scale_in_cooldown  = 300
    scale_out_cooldown = 60

    predefined_metric_specification {
      predefined_metric_type = "ECSServiceAverageCPUUtilization"
    }
  }
}
